//! Test harness for edgeinfer's integration tests: a real mosquitto broker on a free loopback
//! port per test, the real `edgeinfer` binary as a child process, a real MQTT client, and the
//! fixture models with their onnxruntime reference outputs.
//!
//! Nothing here fakes a broker or a model. Fault injection (killing the broker, signals) is done
//! to real processes and is named as such at the call site.

mod broker;
mod client;
mod daemon;
mod fixtures;
mod notify;
mod procs;
mod proxy;

pub use broker::*;
pub use client::*;
pub use daemon::*;
pub use fixtures::*;
pub use notify::*;
pub use procs::*;
pub use proxy::*;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow, bail};
use serde_json::Value;

/// Repository root (this crate lives in `tests/`).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_default()
}

pub fn fixtures() -> PathBuf {
    repo_root().join("tests/fixtures")
}

/// Polls `cond` until it holds or `timeout` passes (instead of sleeping a fixed time).
pub fn eventually(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `assert!` with polling: fails with the message if the condition does not hold in time.
#[macro_export]
macro_rules! assert_eventually {
    ($timeout:expr, $cond:expr, $($msg:tt)+) => {
        assert!($crate::eventually($timeout, || $cond), $($msg)+)
    };
}

/// The books of one pipeline in a health message: `received = served + rejected + dropped +
/// failed + queued + in flight`, every frame accounted for by reason. Returns the sum of
/// rejected frames by reason, for the caller's own checks.
pub fn books_balance(
    health: &Value,
    pipeline: &str,
) -> Result<std::collections::BTreeMap<String, u64>> {
    let p = &health["pipelines"][pipeline];
    let c = &p["counters"];
    let num =
        |v: &Value, what: &str| v.as_u64().ok_or_else(|| anyhow!("{pipeline}: no {what} in {c}"));
    let mut sum = num(&c["served"], "served")?;
    let mut rejected = std::collections::BTreeMap::new();
    for k in ["rejected", "dropped", "failed"] {
        for (reason, n) in c[k].as_object().ok_or_else(|| anyhow!("{pipeline}: no {k}"))? {
            let n = num(n, reason)?;
            sum += n;
            if k == "rejected" && n > 0 {
                rejected.insert(reason.clone(), n);
            }
        }
    }
    sum +=
        p["queue"]["depth"].as_u64().unwrap_or(0) + p["queue"]["in_flight"].as_u64().unwrap_or(0);
    let received = num(&c["received"], "received")?;
    if received != sum {
        bail!(
            "{pipeline}: received {received} != served + rejected + dropped + failed + queued + in flight = {sum}: {c}"
        );
    }
    Ok(rejected)
}
