//! Reading a process's threads and CPU placement from /proc.

use std::fs;

/// Threads of a process: (tid, name, text of its status file).
pub fn threads(pid: i32) -> Vec<(i32, String, String)> {
    let mut out = Vec::new();
    if let Ok(entries) = fs::read_dir(format!("/proc/{pid}/task")) {
        for e in entries.flatten() {
            let tid: i32 = e.file_name().to_string_lossy().parse().unwrap_or(0);
            let comm =
                fs::read_to_string(e.path().join("comm")).unwrap_or_default().trim().to_string();
            let status = fs::read_to_string(e.path().join("status")).unwrap_or_default();
            out.push((tid, comm, status));
        }
    }
    out
}

/// One field of a `/proc/*/status` text, trimmed.
pub fn status_field(status: &str, key: &str) -> Option<String> {
    status.lines().find_map(|l| l.strip_prefix(&format!("{key}:")).map(|v| v.trim().to_string()))
}

/// CPUs this test process may run on.
pub fn allowed_cpus() -> Vec<usize> {
    use nix::sched::{CpuSet, sched_getaffinity};
    sched_getaffinity(nix::unistd::Pid::from_raw(0))
        .map(|set| (0..CpuSet::count()).filter(|c| set.is_set(*c).unwrap_or(false)).collect())
        .unwrap_or_default()
}
