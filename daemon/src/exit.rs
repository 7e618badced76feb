//! How the process ends: the exit codes every subcommand uses (sysexits where one applies, as
//! systemd's `RestartPreventExitStatus=` expects) and the one way errors are printed. At the
//! bottom of the module graph, so the CLI and the demo share it without importing each other.

/// sysexits: command line usage error.
pub const EX_USAGE: u8 = 64;
/// sysexits: configuration error.
pub const EX_CONFIG: u8 = 78;
/// Runtime failure.
pub const EX_FAILURE: u8 = 1;

/// Prints an error with its source chain on one line each (Display, never Debug).
pub fn report(e: &dyn std::error::Error) {
    eprintln!("error: {e}");
    let mut src = e.source();
    while let Some(s) = src {
        eprintln!("  caused by: {s}");
        src = s.source();
    }
}
