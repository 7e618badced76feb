//! The operating system side of an appliance daemon: CPU sets and thread placement, cgroup v2
//! delegation and limits, capabilities and no_new_privs, systemd notification, and reading
//! process and board state from procfs and sysfs (CPU time, frequency, temperature), and the
//! booted A/B slot and image version.
//!
//! Depends on nothing else in the crate; `app` decides when each piece runs (the start-up
//! order matters: capabilities are per thread, so they are dropped before any thread exists).
//! Paths the kernel provides (`/sys/fs/cgroup`, `/proc`, `/sys`) are parameters, so tests use
//! temp-dir fakes.

pub mod boot;
pub mod cgroup;
pub mod cpus;
pub mod fsutil;
pub mod notify;
pub mod privs;
pub mod procfs;

/// The calling thread's kernel thread id (what `cgroup.threads` and `/proc/*/task/` use).
pub fn gettid() -> i32 {
    rustix::thread::gettid().as_raw_nonzero().get()
}
