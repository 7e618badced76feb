//! Test-only fault hooks (feature `fault-hooks`, never in device builds): ways for the
//! integration and VM tests to break the daemon on purpose and check that the safety nets
//! (systemd watchdog, accounting) notice.
//!
//! `EDGEINFER_FAULT_WEDGE_SEQ=N`: a worker that picks up a frame with `seq == N` stops making
//! progress forever, as a deadlocked or spinning inference would.

use std::sync::OnceLock;

fn wedge_seq() -> Option<u64> {
    static SEQ: OnceLock<Option<u64>> = OnceLock::new();
    *SEQ.get_or_init(|| {
        std::env::var("EDGEINFER_FAULT_WEDGE_SEQ").ok().and_then(|s| s.parse().ok())
    })
}

/// Wedges the calling worker forever if `seq` is the configured one.
pub fn maybe_wedge(seq: Option<u64>) {
    if seq.is_some() && seq == wedge_seq() {
        log::error!("fault hook: wedging this worker on seq {seq:?}");
        loop {
            std::thread::park();
        }
    }
}
