//! `edgeinfer` binary: parse the command line, install the logger, hand over to the library.

use std::process::ExitCode;

#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::Parser;
use edgeinfer::cli::{self, Cli, EX_USAGE};

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { EX_USAGE } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    match cli::log_level(&cli) {
        Ok(level) => {
            edgeinfer::logging::init(level);
        }
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EX_USAGE);
        }
    }
    cli::dispatch(cli)
}
