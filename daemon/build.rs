//! Records the git commit for the start-up log line (`EDGEINFER_GIT_HASH`), when built from a
//! git checkout; builds from a source tarball (e.g. Yocto) report "unknown commit". Also records
//! the tract version from Cargo.lock (`EDGEINFER_TRACT_VERSION`), which keys the model cache.

use std::process::Command;

/// The tract version in the workspace's Cargo.lock (the model cache keys on it).
fn tract_version() {
    println!("cargo:rerun-if-changed=../Cargo.lock");
    let Ok(lock) = std::fs::read_to_string("../Cargo.lock") else { return };
    let mut lines = lock.lines();
    while let Some(l) = lines.next() {
        if l.trim() == "name = \"tract-core\""
            && let Some(v) = lines.next().and_then(|v| v.trim().strip_prefix("version = "))
        {
            println!("cargo:rustc-env=EDGEINFER_TRACT_VERSION={}", v.trim_matches('"'));
            return;
        }
    }
}

fn main() {
    tract_version();
    println!("cargo:rerun-if-env-changed=EDGEINFER_GIT_HASH");
    if std::env::var_os("EDGEINFER_GIT_HASH").is_some() {
        return;
    }
    let out = Command::new("git").args(["rev-parse", "--short=12", "HEAD"]).output();
    if let Ok(out) = out
        && out.status.success()
    {
        let hash = String::from_utf8_lossy(&out.stdout).trim().to_string();
        println!("cargo:rustc-env=EDGEINFER_GIT_HASH={hash}");
        if let Ok(dir) = Command::new("git").args(["rev-parse", "--git-dir"]).output() {
            let dir = String::from_utf8_lossy(&dir.stdout).trim().to_string();
            println!("cargo:rerun-if-changed={dir}/HEAD");
            println!("cargo:rerun-if-changed={dir}/refs/heads");
        }
    }
}
