//! cgroup v2: finding our cgroup, deciding whether it was delegated to us, laying out the
//! subtree (threads of I/O and inference in their own threaded leaves), writing limits, and
//! reading usage and pressure.
//!
//! Every path goes through [`CgroupFs`], whose root is injectable, so unit tests run against a
//! temp-dir fake that holds the kernel's file formats. Layout when delegated (`Delegate=yes`):
//!
//! ```text
//! <service cgroup>/            subtree_control: +memory +cpu +cpuset
//!   daemon/                    the process (domain threaded): memory.high, memory.max
//!     io/                      threaded: MQTT/tokio threads; cpuset.cpus, cpu.max
//!     inference/               threaded: worker threads;   cpuset.cpus, cpu.max
//! ```
//!
//! The process has to leave the service cgroup itself before controllers can be enabled for
//! children (cgroup v2's "no internal processes" rule); memory is a domain controller, so its
//! limits sit on `daemon/`, while cpu and cpuset are threaded and apply per leaf.

use std::fmt;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use super::cpus::CpuList;

/// Errors while setting up a delegated subtree (reading stats never fails hard).
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("cannot {action} {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn io_err(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> CgroupError + use<> {
    let path = path.to_path_buf();
    move |source| CgroupError::Io { action, path, source }
}

/// The cgroup v2 mount (normally `/sys/fs/cgroup`).
#[derive(Debug, Clone)]
pub struct CgroupFs {
    pub root: PathBuf,
}

/// What we may do with our cgroup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Access {
    /// Not usable at all (v1/hybrid, root cgroup, ...), with the reason.
    Unavailable(String),
    /// Readable (usage and pressure), but not ours to change; the reason says why.
    ReadOnly { dir: PathBuf, reason: String },
    /// Delegated to us: we may create children and write limits.
    Delegated { dir: PathBuf },
}

impl CgroupFs {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// Finds our cgroup from the text of `/proc/self/cgroup` and decides what we may do with it.
    /// `euid` is our effective uid (delegation to a non-root user shows as ownership).
    pub fn detect(&self, proc_self_cgroup: &str, euid: u32) -> Access {
        if !self.root.join("cgroup.controllers").exists() {
            return Access::Unavailable(format!(
                "cgroup v2 is not mounted at {} (cgroup v1 or a hybrid hierarchy)",
                self.root.display()
            ));
        }
        let Some(rel) = proc_self_cgroup.lines().find_map(|l| l.strip_prefix("0::")) else {
            return Access::Unavailable("/proc/self/cgroup has no cgroup v2 entry".into());
        };
        let rel = rel.trim().trim_start_matches('/');
        if rel.is_empty() {
            return Access::Unavailable("the process runs in the root cgroup".into());
        }
        // When we already moved into our own `daemon/` leaf (e.g. detect after setup), the
        // delegated cgroup is its parent.
        let mut dir = self.root.join(rel);
        if dir.file_name().is_some_and(|n| n == DAEMON)
            && is_delegated(dir.parent().unwrap_or(&dir), euid)
        {
            dir = dir.parent().map(Path::to_path_buf).unwrap_or(dir);
        }
        if !dir.is_dir() {
            return Access::Unavailable(format!("{} does not exist", dir.display()));
        }
        if !is_delegated(&dir, euid) {
            return Access::ReadOnly {
                dir,
                reason:
                    "the cgroup is not delegated to this service (set Delegate=yes in the unit)"
                        .into(),
            };
        }
        Access::Delegated { dir }
    }
}

/// systemd marks delegated cgroups with the `trusted.delegate` (and since v253 `user.delegate`)
/// extended attribute, and hands the directory to the service's user.
fn is_delegated(dir: &Path, euid: u32) -> bool {
    for attr in ["user.delegate", "trusted.delegate"] {
        if let Ok(Some(v)) = xattr::get(dir, attr)
            && v.as_slice() == b"1"
        {
            return true;
        }
    }
    use std::os::unix::fs::MetadataExt;
    euid != 0 && fs::metadata(dir).is_ok_and(|m| m.uid() == euid)
}

/// Name of the leaf that holds the process.
pub const DAEMON: &str = "daemon";
pub const IO: &str = "io";
pub const INFERENCE: &str = "inference";

/// `cpu.max`: a quota of `max_us` per `period_us`, or unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuMax {
    pub max_us: Option<u64>,
    pub period_us: u64,
}

impl CpuMax {
    /// From a share of one CPU in percent (`150` = one and a half CPUs) with a 100 ms period.
    pub fn percent(p: u32) -> Self {
        CpuMax { max_us: Some(u64::from(p) * 1000), period_us: 100_000 }
    }
}

impl fmt::Display for CpuMax {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.max_us {
            Some(m) => write!(f, "{m} {}", self.period_us),
            None => write!(f, "max {}", self.period_us),
        }
    }
}

/// What to write into the subtree.
#[derive(Debug, Clone, Default)]
pub struct Plan {
    pub memory_high: Option<u64>,
    pub memory_max: Option<u64>,
    pub io_cpus: CpuList,
    pub inference_cpus: CpuList,
    pub io_cpu_max: Option<CpuMax>,
    pub inference_cpu_max: Option<CpuMax>,
}

/// The subtree after setup.
#[derive(Debug, Clone)]
pub struct Layout {
    pub service: PathBuf,
    pub daemon: PathBuf,
    pub io: PathBuf,
    pub inference: PathBuf,
    /// What was not applied and why (missing controllers), for the one log line and health.
    pub skipped: Vec<String>,
    /// What was written, for the log and health (`memory.high=...`).
    pub applied: Vec<String>,
}

fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    fs::write(path, value).map_err(io_err("write", path))
}

fn controllers(dir: &Path) -> Vec<String> {
    fs::read_to_string(dir.join("cgroup.controllers"))
        .map(|s| s.split_whitespace().map(str::to_string).collect())
        .unwrap_or_default()
}

/// Creates the layout in a delegated cgroup, moves the process into `daemon/` and writes the
/// limits of `plan`. Limits whose controller is not available are skipped and reported.
pub fn setup(service: &Path, plan: &Plan, pid: u32) -> Result<Layout, CgroupError> {
    let daemon = service.join(DAEMON);
    let io = daemon.join(IO);
    let inference = daemon.join(INFERENCE);
    let mut skipped = Vec::new();
    let mut applied = Vec::new();
    // 1. Leave the service cgroup: a cgroup with processes cannot enable controllers for
    //    its children. Moving the pid moves every thread.
    if !daemon.is_dir() {
        fs::create_dir(&daemon).map_err(io_err("create", &daemon))?;
    }
    write(&daemon.join("cgroup.procs"), &pid.to_string())?;
    // 2. Domain controllers for `daemon/`.
    let available = controllers(service);
    let wanted: Vec<&str> = ["memory", "cpu", "cpuset"]
        .into_iter()
        .filter(|c| available.iter().any(|a| a == c))
        .collect();
    for c in ["memory", "cpu", "cpuset"] {
        if !wanted.contains(&c) {
            skipped.push(format!("{c} controller not available in {}", service.display()));
        }
    }
    if !wanted.is_empty() {
        let line: Vec<String> = wanted.iter().map(|c| format!("+{c}")).collect();
        write(&service.join("cgroup.subtree_control"), &line.join(" "))?;
    }
    let has = |c: &str| wanted.contains(&c);
    for (file, value) in [("memory.high", plan.memory_high), ("memory.max", plan.memory_max)] {
        if let Some(v) = value {
            if has("memory") {
                write(&daemon.join(file), &v.to_string())?;
                applied.push(format!("{file}={v}"));
            } else {
                skipped.push(format!("{file}={v} (no memory controller)"));
            }
        }
    }
    // 3. Threaded leaves for I/O and inference threads.
    for leaf in [&io, &inference] {
        if !leaf.is_dir() {
            fs::create_dir(leaf).map_err(io_err("create", leaf))?;
        }
        write(&leaf.join("cgroup.type"), "threaded")?;
    }
    let threaded: Vec<String> =
        ["cpu", "cpuset"].into_iter().filter(|c| has(c)).map(|c| format!("+{c}")).collect();
    if !threaded.is_empty() {
        write(&daemon.join("cgroup.subtree_control"), &threaded.join(" "))?;
    }
    for (leaf, cpus, cpu_max) in [
        (&io, &plan.io_cpus, plan.io_cpu_max),
        (&inference, &plan.inference_cpus, plan.inference_cpu_max),
    ] {
        let name = leaf.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        if !cpus.is_empty() {
            if has("cpuset") {
                write(&leaf.join("cpuset.cpus"), &cpus.to_string())?;
                applied.push(format!("{name}/cpuset.cpus={cpus}"));
            } else {
                skipped.push(format!("{name}/cpuset.cpus (no cpuset controller)"));
            }
        }
        if let Some(m) = cpu_max {
            if has("cpu") {
                write(&leaf.join("cpu.max"), &m.to_string())?;
                applied.push(format!("{name}/cpu.max={m}"));
            } else {
                skipped.push(format!("{name}/cpu.max (no cpu controller)"));
            }
        }
    }
    Ok(Layout { service: service.to_path_buf(), daemon, io, inference, skipped, applied })
}

/// Moves one thread (by kernel tid) into a threaded leaf.
pub fn move_thread(leaf: &Path, tid: i32) -> Result<(), CgroupError> {
    write(&leaf.join("cgroup.threads"), &tid.to_string())
}

/// Pressure stall information for one resource (`some`, and `full` where the kernel has it).
#[derive(Debug, Clone, Copy, PartialEq, Default, serde::Serialize)]
pub struct PsiLine {
    pub avg10: f64,
    pub avg60: f64,
    pub avg300: f64,
    /// Total stall time in microseconds.
    pub total: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Default, serde::Serialize)]
pub struct Psi {
    pub some: PsiLine,
    pub full: Option<PsiLine>,
}

/// Parses a PSI file (`some avg10=0.00 avg60=0.00 avg300=0.00 total=0` / `full ...`).
pub fn parse_psi(text: &str) -> Option<Psi> {
    let mut some = None;
    let mut full = None;
    for line in text.lines() {
        let mut parts = line.split_whitespace();
        let kind = parts.next()?;
        let mut l = PsiLine::default();
        for kv in parts {
            let (k, v) = kv.split_once('=')?;
            match k {
                "avg10" => l.avg10 = v.parse().ok()?,
                "avg60" => l.avg60 = v.parse().ok()?,
                "avg300" => l.avg300 = v.parse().ok()?,
                "total" => l.total = v.parse().ok()?,
                _ => {}
            }
        }
        match kind {
            "some" => some = Some(l),
            "full" => full = Some(l),
            _ => {}
        }
    }
    Some(Psi { some: some?, full })
}

/// Parses a flat keyed file (`memory.events`: `low 0\nhigh 12\nmax 0\noom 0\noom_kill 0`).
pub fn parse_flat_keyed(text: &str) -> Vec<(String, u64)> {
    text.lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(' ')?;
            Some((k.to_string(), v.trim().parse().ok()?))
        })
        .collect()
}

/// A limit file (`memory.max`): a number, or `None` for `max`.
pub fn parse_limit(text: &str) -> Option<u64> {
    let t = text.trim();
    if t == "max" { None } else { t.parse().ok() }
}

/// Usage, events and pressure of one cgroup; fields the kernel does not provide are `None`.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Stats {
    pub memory_current: Option<u64>,
    pub memory_high: Option<u64>,
    pub memory_max: Option<u64>,
    /// `memory.events` counters (low, high, max, oom, oom_kill).
    pub memory_events: Vec<(String, u64)>,
    pub memory_pressure: Option<Psi>,
    pub cpu_pressure: Option<Psi>,
}

pub fn read_stats(dir: &Path) -> Stats {
    let read = |f: &str| fs::read_to_string(dir.join(f)).ok();
    Stats {
        memory_current: read("memory.current").and_then(|s| s.trim().parse().ok()),
        memory_high: read("memory.high").and_then(|s| parse_limit(&s)),
        memory_max: read("memory.max").and_then(|s| parse_limit(&s)),
        memory_events: read("memory.events").map(|s| parse_flat_keyed(&s)).unwrap_or_default(),
        memory_pressure: read("memory.pressure").and_then(|s| parse_psi(&s)),
        cpu_pressure: read("cpu.pressure").and_then(|s| parse_psi(&s)),
    }
}

/// The tightest memory limit (`memory.max`, else `memory.high`) from `dir` up to `root`.
pub fn effective_memory_limit(root: &Path, dir: &Path) -> Option<u64> {
    let mut best: Option<u64> = None;
    let mut cur = Some(dir);
    while let Some(d) = cur {
        if !d.starts_with(root) || d == root {
            break;
        }
        for f in ["memory.max", "memory.high"] {
            if let Some(v) = fs::read_to_string(d.join(f)).ok().and_then(|s| parse_limit(&s)) {
                best = Some(best.map_or(v, |b| b.min(v)));
            }
        }
        cur = d.parent();
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A temp-dir stand-in for a cgroup2 mount with the kernel's file formats (fault-free fake;
    /// the VM test in `image/` covers the real kernel).
    struct FakeCgroupFs {
        dir: tempfile::TempDir,
    }

    impl FakeCgroupFs {
        fn new(controllers: &str) -> Self {
            let dir = tempfile::tempdir().expect("tmp");
            let svc = dir.path().join("system.slice/edgeinfer.service");
            fs::create_dir_all(&svc).expect("mkdir");
            fs::write(dir.path().join("cgroup.controllers"), "cpuset cpu io memory pids\n")
                .expect("w");
            fs::write(svc.join("cgroup.controllers"), controllers).expect("w");
            fs::write(svc.join("cgroup.subtree_control"), "").expect("w");
            fs::write(svc.join("cgroup.procs"), "4242\n").expect("w");
            fs::write(svc.join("memory.max"), "max\n").expect("w");
            fs::write(dir.path().join("system.slice/memory.max"), "536870912\n").expect("w");
            Self { dir }
        }
        fn fs(&self) -> CgroupFs {
            CgroupFs::new(self.dir.path())
        }
        fn service(&self) -> PathBuf {
            self.dir.path().join("system.slice/edgeinfer.service")
        }
        fn read(&self, rel: &str) -> String {
            fs::read_to_string(self.service().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
        }
    }

    const SELF_CGROUP: &str = "0::/system.slice/edgeinfer.service\n";

    #[test]
    fn detection_needs_v2_a_non_root_cgroup_and_delegation() {
        let fake = FakeCgroupFs::new("cpuset cpu memory\n");
        let fs_ = fake.fs();
        // Delegation to a service user shows as ownership of the cgroup directory.
        let euid = nix::unistd::geteuid().as_raw();
        let user = if euid == 0 {
            std::os::unix::fs::chown(fake.service(), Some(4242), None).expect("chown");
            4242
        } else {
            euid
        };
        assert_eq!(fs_.detect(SELF_CGROUP, user), Access::Delegated { dir: fake.service() });
        match fs_.detect(SELF_CGROUP, user + 1) {
            Access::ReadOnly { reason, .. } => assert!(reason.contains("Delegate=yes"), "{reason}"),
            other => panic!("unexpected {other:?}"),
        }
        // After setup the process sits in daemon/: the service cgroup is still found.
        fs::create_dir(fake.service().join(DAEMON)).expect("mkdir");
        let inside = "0::/system.slice/edgeinfer.service/daemon\n";
        assert_eq!(fs_.detect(inside, user), Access::Delegated { dir: fake.service() });
        assert!(
            matches!(fs_.detect("0::/\n", user), Access::Unavailable(r) if r.contains("root cgroup"))
        );
        assert!(
            matches!(fs_.detect("1:memory:/x\n", user), Access::Unavailable(r) if r.contains("no cgroup v2"))
        );
        let v1 = CgroupFs::new(fake.dir.path().join("nope"));
        assert!(
            matches!(v1.detect(SELF_CGROUP, user), Access::Unavailable(r) if r.contains("cgroup v1"))
        );
    }

    #[test]
    fn setup_writes_layout_and_limits_into_the_right_files() {
        let fake = FakeCgroupFs::new("cpuset cpu io memory pids\n");
        let plan = Plan {
            memory_high: Some(200 << 20),
            memory_max: Some(256 << 20),
            io_cpus: CpuList::parse("0").expect("l"),
            inference_cpus: CpuList::parse("1-3").expect("l"),
            io_cpu_max: Some(CpuMax::percent(50)),
            inference_cpu_max: None,
        };
        let layout = setup(&fake.service(), &plan, 4242).expect("setup");
        assert_eq!(fake.read("daemon/cgroup.procs"), "4242");
        assert_eq!(fake.read("cgroup.subtree_control"), "+memory +cpu +cpuset");
        assert_eq!(fake.read("daemon/memory.high"), (200u64 << 20).to_string());
        assert_eq!(fake.read("daemon/memory.max"), (256u64 << 20).to_string());
        assert_eq!(fake.read("daemon/cgroup.subtree_control"), "+cpu +cpuset");
        assert_eq!(fake.read("daemon/io/cgroup.type"), "threaded");
        assert_eq!(fake.read("daemon/inference/cgroup.type"), "threaded");
        assert_eq!(fake.read("daemon/io/cpuset.cpus"), "0");
        assert_eq!(fake.read("daemon/inference/cpuset.cpus"), "1-3");
        assert_eq!(fake.read("daemon/io/cpu.max"), "50000 100000");
        assert!(
            !fake.service().join("daemon/inference/cpu.max").exists(),
            "unset limits are not written"
        );
        assert!(layout.skipped.is_empty(), "{:?}", layout.skipped);
        move_thread(&layout.inference, 4243).expect("move");
        assert_eq!(fake.read("daemon/inference/cgroup.threads"), "4243");
        // Idempotent: a restart reuses the existing leaves.
        setup(&fake.service(), &plan, 4300).expect("second setup");
        assert_eq!(fake.read("daemon/cgroup.procs"), "4300");
    }

    #[test]
    fn missing_controllers_are_skipped_and_reported() {
        let fake = FakeCgroupFs::new("pids\n");
        let plan = Plan {
            memory_max: Some(1 << 30),
            inference_cpus: CpuList::parse("1").expect("l"),
            inference_cpu_max: Some(CpuMax::percent(100)),
            ..Plan::default()
        };
        let layout = setup(&fake.service(), &plan, 1).expect("setup");
        assert!(!fake.service().join("daemon/memory.max").exists());
        let s = layout.skipped.join("; ");
        for want in [
            "memory controller not available",
            "memory.max=1073741824 (no memory controller)",
            "inference/cpuset.cpus (no cpuset controller)",
            "inference/cpu.max (no cpu controller)",
        ] {
            assert!(s.contains(want), "missing {want:?} in {s}");
        }
        assert_eq!(fake.read("cgroup.subtree_control"), "", "nothing to enable");
    }

    #[test]
    fn parses_kernel_stat_formats() {
        let psi = parse_psi(
            "some avg10=1.50 avg60=0.25 avg300=0.00 total=123456\nfull avg10=0.10 avg60=0.00 avg300=0.00 total=789\n",
        )
        .expect("psi");
        assert_eq!(psi.some, PsiLine { avg10: 1.5, avg60: 0.25, avg300: 0.0, total: 123456 });
        assert_eq!(psi.full.map(|f| f.total), Some(789));
        assert_eq!(
            parse_psi("some avg10=0.00 avg60=0.00 avg300=0.00 total=5\n").map(|p| p.full),
            Some(None)
        );
        assert_eq!(parse_psi("garbage"), None);
        let ev = parse_flat_keyed("low 0\nhigh 12\nmax 3\noom 1\noom_kill 1\n");
        assert_eq!(ev[1], ("high".to_string(), 12));
        assert_eq!(ev.len(), 5);
        assert_eq!(parse_limit("max\n"), None);
        assert_eq!(parse_limit("1048576\n"), Some(1 << 20));
    }

    #[test]
    fn stats_and_effective_limits_are_read_from_the_tree() {
        let fake = FakeCgroupFs::new("cpuset cpu memory\n");
        let svc = fake.service();
        fs::write(svc.join("memory.current"), "10485760\n").expect("w");
        fs::write(svc.join("memory.events"), "low 0\nhigh 2\nmax 0\noom 0\noom_kill 0\n")
            .expect("w");
        fs::write(svc.join("memory.pressure"), "some avg10=0.00 avg60=0.00 avg300=0.00 total=7\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=3\n").expect("w");
        let s = read_stats(&svc);
        assert_eq!(s.memory_current, Some(10 << 20));
        assert_eq!(s.memory_max, None, "max means unlimited");
        assert_eq!(s.memory_events.iter().find(|(k, _)| k == "high").map(|(_, v)| *v), Some(2));
        assert_eq!(s.memory_pressure.map(|p| p.some.total), Some(7));
        assert!(s.cpu_pressure.is_none(), "kernels without PSI have no pressure files");
        // The parent slice's 512 MiB limit applies.
        assert_eq!(effective_memory_limit(fake.dir.path(), &svc), Some(512 << 20));
    }
}
