//! What the kernel says about this process and the board, for the numbers operators read next
//! to latency: CPU time, threads, memory and context switches of the process (`/proc/self`),
//! per-thread CPU time (to tell inference workers apart), CPU frequency and governor, and
//! thermal zones (`/sys`). A CPU governor or a hot SoC alone swings latency 3-4x on a
//! Raspberry Pi or a Jetson.
//!
//! Only reads: it does not decide anything, log, or export; `telemetry` turns the structs here
//! into health JSON and Prometheus text. Roots (`/proc`, `/sys`) are parameters, so unit tests
//! run against temp-dir fakes holding the kernel's file formats.
//!
//! Reading never panics and is bounded: at most [`MAX_FILE_BYTES`] per file and
//! [`MAX_ENTRIES`] CPUs, zones or threads. Only the process's own `stat`/`status` are required
//! ([`read_process`] fails without them); everything else the kernel may lack (cpufreq in a VM,
//! a thermal zone whose sensor returns `EINVAL`/`ENODATA`) is `None` or left out.

use std::ffi::OsStr;
use std::fs;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

/// Most bytes read from one file (the kernel's files here are well under 4 KiB).
pub const MAX_FILE_BYTES: u64 = 64 * 1024;
/// Most CPUs, thermal zones or threads reported.
pub const MAX_ENTRIES: usize = 1024;
/// Most trip points looked at per thermal zone.
const MAX_TRIPS: usize = 64;
/// Most lines of `cpufreq/stats/time_in_state` (one per frequency step).
const MAX_FREQ_STEPS: usize = 256;

/// Errors reading the process's own `/proc` files (the board-level readers never fail).
#[derive(Debug, thiserror::Error)]
pub enum ProcError {
    #[error("cannot read {path} (hint: is procfs mounted there?)")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot parse {path}: {what}")]
    Parse { path: PathBuf, what: &'static str },
}

/// Resource use of this process since it started (counters are cumulative).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ProcessStats {
    pub cpu_user_seconds: f64,
    pub cpu_system_seconds: f64,
    pub threads: u64,
    pub rss_bytes: u64,
    /// Peak resident set size (`VmHWM`).
    pub vm_hwm_bytes: Option<u64>,
    /// Open file descriptors (not counting the one used to count them).
    pub open_fds: Option<u64>,
    pub voluntary_ctxt_switches: Option<u64>,
    pub nonvoluntary_ctxt_switches: Option<u64>,
    pub minor_faults: Option<u64>,
    pub major_faults: Option<u64>,
}

/// CPU time and placement of one thread of this process.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ThreadStats {
    /// Kernel thread id (what [`super::gettid`] returns).
    pub tid: i32,
    /// The thread name (`comm`, at most 15 bytes; invalid UTF-8 replaced).
    pub name: String,
    /// User plus system CPU time.
    pub cpu_seconds: f64,
    /// The CPU it last ran on.
    pub processor: Option<usize>,
}

/// Frequency scaling state of one CPU.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct CpuFreq {
    pub cpu: usize,
    pub cur_hz: Option<u64>,
    /// The policy's limits; a thermal or power cap shows as `max_hz` below `hw_max_hz`.
    pub min_hz: Option<u64>,
    pub max_hz: Option<u64>,
    /// What the hardware can do (`cpuinfo_max_freq`).
    pub hw_max_hz: Option<u64>,
    pub governor: Option<String>,
    /// Cumulative time at each frequency since boot (`stats/time_in_state`, kernels with
    /// `CONFIG_CPU_FREQ_STAT`); the same for every CPU of one policy.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub time_in_state: Vec<FreqResidency>,
}

/// Time spent at one frequency.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct FreqResidency {
    pub hz: u64,
    pub seconds: f64,
}

/// One thermal zone's temperature.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ThermalZone {
    pub zone: usize,
    /// The raw `type` (`cpu-thermal`, `gpu-thermal`, `tj-thermal`, ...).
    pub kind: String,
    pub celsius: f64,
    /// Where the kernel shuts the board down.
    pub trip_critical_celsius: Option<f64>,
    /// The lowest passive trip point: where the kernel starts throttling.
    pub trip_passive_celsius: Option<f64>,
}

/// The board's CPU frequencies and temperatures.
#[derive(Debug, Clone, PartialEq, Default, serde::Serialize)]
pub struct HostSnapshot {
    pub cpufreq: Vec<CpuFreq>,
    pub thermal: Vec<ThermalZone>,
}

/// `USER_HZ`, the unit of CPU times in `/proc` and of cpufreq's `time_in_state`.
pub fn clock_ticks_per_second() -> u64 {
    // sysconf cannot fail for this on Linux; 100 is what every architecture we run on exports.
    match nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK) {
        Ok(Some(t)) => u64::try_from(t).ok().filter(|&t| t > 0).unwrap_or(100),
        _ => 100,
    }
}

fn page_size() -> u64 {
    match nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE) {
        Ok(Some(p)) => u64::try_from(p).ok().filter(|&p| p > 0).unwrap_or(4096),
        _ => 4096,
    }
}

/// Reads at most [`MAX_FILE_BYTES`]. Lossy: a thread name may hold any byte but NUL.
fn read_capped(path: &Path) -> io::Result<String> {
    let mut buf = Vec::new();
    fs::File::open(path)?.take(MAX_FILE_BYTES).read_to_end(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

/// The value of a numbered entry (`cpu12`, `thermal_zone3`), if `name` is one.
fn numbered(name: &OsStr, prefix: &str) -> Option<usize> {
    let digits = name.to_str()?.strip_prefix(prefix)?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Numbers of the `<prefix>N` entries of `dir`, sorted, at most [`MAX_ENTRIES`].
fn numbered_entries(dir: &Path, prefix: &str) -> Vec<usize> {
    let Ok(entries) = fs::read_dir(dir) else { return Vec::new() };
    let mut out: Vec<usize> =
        entries.filter_map(|e| numbered(&e.ok()?.file_name(), prefix)).take(MAX_ENTRIES).collect();
    out.sort_unstable();
    out
}

/// A `/proc/<pid>/stat` line split around `comm`: the name, and the fields from 3 (`state`) on.
struct Stat<'a> {
    comm: &'a str,
    rest: Vec<&'a str>,
}

impl<'a> Stat<'a> {
    /// `comm` may contain spaces and `)`, but nothing after it can: split at the last `)`.
    fn parse(line: &'a str) -> Option<Self> {
        let open = line.find('(')?;
        let close = line.rfind(')')?;
        if close < open {
            return None;
        }
        Some(Stat {
            comm: &line[open + 1..close],
            rest: line[close + 1..].split_whitespace().collect(),
        })
    }

    /// Field `n`, numbered as in proc(5) (1 = pid, 2 = comm, 3 = state, ...).
    fn field(&self, n: usize) -> Option<u64> {
        self.rest.get(n.checked_sub(3)?)?.parse().ok()
    }

    fn seconds(&self, n: usize, ticks_per_second: u64) -> Option<f64> {
        // Ticks as f64 are exact below 2^53 (28 million years at 100 Hz).
        Some(self.field(n)? as f64 / ticks_per_second.max(1) as f64)
    }
}

const STAT_MINFLT: usize = 10;
const STAT_MAJFLT: usize = 12;
const STAT_UTIME: usize = 14;
const STAT_STIME: usize = 15;
const STAT_NUM_THREADS: usize = 20;
const STAT_RSS_PAGES: usize = 24;
const STAT_PROCESSOR: usize = 39;

/// A `Key:\tvalue [kB]` line of `/proc/<pid>/status`.
fn status_value(status: &str, key: &str) -> Option<u64> {
    status.lines().find_map(|l| {
        let v = l.strip_prefix(key)?.strip_prefix(':')?;
        v.split_whitespace().next()?.parse().ok()
    })
}

fn status_kib(status: &str, key: &str) -> Option<u64> {
    status_value(status, key).map(|k| k.saturating_mul(1024))
}

fn parse_process(
    stat: &str,
    status: &str,
    ticks_per_second: u64,
    page_size: u64,
) -> Result<ProcessStats, &'static str> {
    let s = Stat::parse(stat).ok_or("no `(comm)` in the stat line")?;
    Ok(ProcessStats {
        cpu_user_seconds: s.seconds(STAT_UTIME, ticks_per_second).ok_or("no utime")?,
        cpu_system_seconds: s.seconds(STAT_STIME, ticks_per_second).ok_or("no stime")?,
        threads: status_value(status, "Threads")
            .or_else(|| s.field(STAT_NUM_THREADS))
            .ok_or("no thread count")?,
        rss_bytes: status_kib(status, "VmRSS")
            .or_else(|| s.field(STAT_RSS_PAGES).map(|p| p.saturating_mul(page_size)))
            .ok_or("no resident set size")?,
        vm_hwm_bytes: status_kib(status, "VmHWM"),
        open_fds: None,
        voluntary_ctxt_switches: status_value(status, "voluntary_ctxt_switches"),
        nonvoluntary_ctxt_switches: status_value(status, "nonvoluntary_ctxt_switches"),
        minor_faults: s.field(STAT_MINFLT),
        major_faults: s.field(STAT_MAJFLT),
    })
}

/// Reads this process's stats from `<proc_root>/self/{stat,status,fd}` (normally `/proc`).
pub fn read_process(proc_root: &Path) -> Result<ProcessStats, ProcError> {
    read_process_with(proc_root, clock_ticks_per_second(), page_size())
}

fn read_process_with(
    proc_root: &Path,
    ticks_per_second: u64,
    page_size: u64,
) -> Result<ProcessStats, ProcError> {
    let dir = proc_root.join("self");
    let read = |name: &str| {
        let path = dir.join(name);
        read_capped(&path).map_err(|source| ProcError::Read { path, source })
    };
    let (stat, status) = (read("stat")?, read("status")?);
    let mut stats = parse_process(&stat, &status, ticks_per_second, page_size)
        .map_err(|what| ProcError::Parse { path: dir.join("stat"), what })?;
    stats.open_fds = count_fds(&dir.join("fd"));
    Ok(stats)
}

/// Counts the entries of a `/proc/<pid>/fd` directory, leaving out the descriptor opened to
/// read it (on procfs it lists itself: an entry named after its number that resolves to the
/// directory). `None` when it cannot be read (hidepid, another user's process).
fn count_fds(fd_dir: &Path) -> Option<u64> {
    let file = fs::File::open(fd_dir).ok()?;
    let own = file.as_raw_fd().to_string();
    let mut dir = rustix::fs::Dir::new(OwnedFd::from(file)).ok()?;
    let me = dir.stat().ok()?;
    let mut n = 0u64;
    while let Some(entry) = dir.read() {
        let entry = entry.ok()?;
        let name = entry.file_name().to_bytes();
        if name == b"." || name == b".." {
            continue;
        }
        if name == own.as_bytes() {
            let is_self = dir.fd().ok().and_then(|fd| {
                rustix::fs::statat(fd, entry.file_name(), rustix::fs::AtFlags::empty()).ok()
            });
            if is_self.is_some_and(|s| s.st_dev == me.st_dev && s.st_ino == me.st_ino) {
                continue;
            }
        }
        n += 1;
    }
    Some(n)
}

/// Reads every thread of this process from `<proc_root>/self/task/*/stat`, sorted by tid.
/// Threads that exit while being read are left out.
pub fn read_threads(proc_root: &Path) -> Vec<ThreadStats> {
    read_threads_with(proc_root, clock_ticks_per_second())
}

fn read_threads_with(proc_root: &Path, ticks_per_second: u64) -> Vec<ThreadStats> {
    let task = proc_root.join("self/task");
    let tids = numbered_entries(&task, "");
    tids.into_iter()
        .filter_map(|tid| {
            let line = read_capped(&task.join(tid.to_string()).join("stat")).ok()?;
            let s = Stat::parse(&line)?;
            let user = s.seconds(STAT_UTIME, ticks_per_second)?;
            let system = s.seconds(STAT_STIME, ticks_per_second)?;
            Some(ThreadStats {
                tid: i32::try_from(tid).ok()?,
                name: s.comm.to_string(),
                cpu_seconds: user + system,
                processor: s.field(STAT_PROCESSOR).and_then(|p| usize::try_from(p).ok()),
            })
        })
        .collect()
}

/// A sysfs frequency in kHz, as Hz (`<unknown>` from some drivers is `None`).
fn read_khz(path: &Path) -> Option<u64> {
    read_capped(path).ok()?.trim().parse::<u64>().ok()?.checked_mul(1000)
}

fn parse_time_in_state(text: &str, ticks_per_second: u64) -> Vec<FreqResidency> {
    text.lines()
        .take(MAX_FREQ_STEPS)
        .filter_map(|l| {
            let mut parts = l.split_whitespace();
            let khz: u64 = parts.next()?.parse().ok()?;
            let ticks: u64 = parts.next()?.parse().ok()?;
            Some(FreqResidency {
                hz: khz.checked_mul(1000)?,
                seconds: ticks as f64 / ticks_per_second.max(1) as f64,
            })
        })
        .collect()
}

/// Reads cpufreq for `cpus` (all `cpuN` under `<sys_root>/devices/system/cpu` when `None`),
/// sorted by CPU. CPUs without a `cpufreq` directory are left out, so a VM gives an empty list.
pub fn read_cpufreq(sys_root: &Path, cpus: Option<&[usize]>) -> Vec<CpuFreq> {
    read_cpufreq_with(sys_root, cpus, clock_ticks_per_second())
}

fn read_cpufreq_with(
    sys_root: &Path,
    cpus: Option<&[usize]>,
    ticks_per_second: u64,
) -> Vec<CpuFreq> {
    let base = sys_root.join("devices/system/cpu");
    let cpus = match cpus {
        Some(list) => {
            let mut v: Vec<usize> = list.iter().copied().take(MAX_ENTRIES).collect();
            v.sort_unstable();
            v.dedup();
            v
        }
        None => numbered_entries(&base, "cpu"),
    };
    cpus.into_iter()
        .filter_map(|cpu| {
            // Often a symlink to ../cpufreq/policyN; is_dir follows it.
            let dir = base.join(format!("cpu{cpu}/cpufreq"));
            if !dir.is_dir() {
                return None;
            }
            let governor = read_capped(&dir.join("scaling_governor"))
                .ok()
                .map(|g| g.trim().to_string())
                .filter(|g| !g.is_empty());
            let time_in_state = read_capped(&dir.join("stats/time_in_state"))
                .map(|t| parse_time_in_state(&t, ticks_per_second))
                .unwrap_or_default();
            Some(CpuFreq {
                cpu,
                cur_hz: read_khz(&dir.join("scaling_cur_freq")),
                min_hz: read_khz(&dir.join("scaling_min_freq")),
                max_hz: read_khz(&dir.join("scaling_max_freq")),
                hw_max_hz: read_khz(&dir.join("cpuinfo_max_freq")),
                governor,
                time_in_state,
            })
        })
        .collect()
}

fn read_millicelsius(path: &Path) -> Option<f64> {
    let m: i64 = read_capped(path).ok()?.trim().parse().ok()?;
    Some(m as f64 / 1000.0)
}

/// Reads `<sys_root>/class/thermal/thermal_zoneN`, sorted by zone. Zones whose `type` or
/// `temp` cannot be read or parsed are left out: some sensors answer `EINVAL` or `ENODATA`
/// while powered down, which is not worth a log line per scrape.
pub fn read_thermal(sys_root: &Path) -> Vec<ThermalZone> {
    let base = sys_root.join("class/thermal");
    numbered_entries(&base, "thermal_zone")
        .into_iter()
        .filter_map(|zone| {
            let dir = base.join(format!("thermal_zone{zone}"));
            let kind = read_capped(&dir.join("type")).ok()?.trim().to_string();
            let celsius = read_millicelsius(&dir.join("temp"))?;
            let mut trip_critical_celsius = None;
            let mut trip_passive_celsius: Option<f64> = None;
            // Trip points are numbered from 0 without gaps.
            for k in 0..MAX_TRIPS {
                let Ok(t) = read_capped(&dir.join(format!("trip_point_{k}_type"))) else {
                    break;
                };
                let temp = || read_millicelsius(&dir.join(format!("trip_point_{k}_temp")));
                match t.trim() {
                    "critical" if trip_critical_celsius.is_none() => {
                        trip_critical_celsius = temp();
                    }
                    "passive" => {
                        if let Some(c) = temp() {
                            trip_passive_celsius =
                                Some(trip_passive_celsius.map_or(c, |p| p.min(c)));
                        }
                    }
                    _ => {}
                }
            }
            Some(ThermalZone { zone, kind, celsius, trip_critical_celsius, trip_passive_celsius })
        })
        .collect()
}

/// Frequencies and temperatures of the board under `sys_root` (normally `/sys`).
pub fn read_host(sys_root: &Path, cpus: Option<&[usize]>) -> HostSnapshot {
    HostSnapshot { cpufreq: read_cpufreq(sys_root, cpus), thermal: read_thermal(sys_root) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(path: &Path, text: &str) {
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).expect("mkdir");
        }
        fs::write(path, text).expect("write");
    }

    /// A stat line as the kernel writes it (52 fields), with the fields the tests care about.
    fn stat_line(pid: u32, comm: &str, utime: u64, stime: u64, threads: u64, cpu: u32) -> String {
        format!(
            "{pid} ({comm}) S 1 {pid} {pid} 0 -1 4194560 1234 0 7 0 {utime} {stime} 0 0 20 0 \
             {threads} 0 5000 123456789 2048 18446744073709551615 1 1 0 0 0 0 0 4096 17664 0 0 \
             0 17 {cpu} 0 0 0 0 0 0 0 0 0 0 0 0 0\n"
        )
    }

    const STATUS: &str = "Name:\tei-x) (y\nUmask:\t0022\nState:\tS (sleeping)\nTgid:\t4242\n\
        VmPeak:\t  912340 kB\nVmHWM:\t   51200 kB\nVmRSS:\t   40960 kB\nRssAnon:\t   30000 kB\n\
        Threads:\t7\nvoluntary_ctxt_switches:\t150\nnonvoluntary_ctxt_switches:\t12\n";

    #[test]
    fn stat_comm_with_spaces_and_parentheses_is_split_at_the_last_paren() {
        let line = stat_line(4242, "ei-x) (y", 250, 50, 7, 3);
        let s = Stat::parse(&line).expect("stat");
        assert_eq!(s.comm, "ei-x) (y");
        assert_eq!(s.field(STAT_UTIME), Some(250));
        assert_eq!(s.field(STAT_PROCESSOR), Some(3));
        assert_eq!(s.field(2), None, "comm is not a numbered field after the split");
        assert!(Stat::parse("4242 ei-x S 1").is_none());
        assert!(Stat::parse("4242 ) ( S").is_none());

        let p = parse_process(&line, STATUS, 100, 4096).expect("parse");
        assert_eq!(p.cpu_user_seconds, 2.5);
        assert_eq!(p.cpu_system_seconds, 0.5);
        assert_eq!(p.minor_faults, Some(1234));
        assert_eq!(p.major_faults, Some(7));
        // Another tick rate (alpha's USER_HZ) scales the times.
        let p = parse_process(&line, STATUS, 1024, 4096).expect("parse");
        assert_eq!(p.cpu_user_seconds, 250.0 / 1024.0);
        assert!(parse_process("4242 (x) S 1 2", STATUS, 100, 4096).is_err(), "truncated line");
    }

    #[test]
    fn status_gives_threads_memory_and_context_switches() {
        let line = stat_line(4242, "edgeinfer", 0, 0, 99, 0);
        let p = parse_process(&line, STATUS, 100, 4096).expect("parse");
        assert_eq!(p.threads, 7, "status wins over stat");
        assert_eq!(p.rss_bytes, 40960 * 1024);
        assert_eq!(p.vm_hwm_bytes, Some(51200 * 1024));
        assert_eq!(p.voluntary_ctxt_switches, Some(150));
        assert_eq!(p.nonvoluntary_ctxt_switches, Some(12));
        // A status without the lines (gVisor-like) falls back to stat's counts.
        let p = parse_process(&line, "Name:\tedgeinfer\n", 100, 4096).expect("parse");
        assert_eq!((p.threads, p.rss_bytes), (99, 2048 * 4096));
        assert_eq!((p.vm_hwm_bytes, p.voluntary_ctxt_switches), (None, None));
        assert_eq!(status_value("VmRSSx:\t5 kB\n", "VmRSS"), None, "keys match exactly");
    }

    #[test]
    fn process_is_read_from_a_fake_proc_with_its_fds_counted() {
        let root = tempfile::tempdir().expect("tmp");
        let me = root.path().join("self");
        write(&me.join("stat"), &stat_line(4242, "ei-x) (y", 300, 100, 7, 1));
        write(&me.join("status"), STATUS);
        for fd in ["0", "1", "2", "5", "17"] {
            write(&me.join("fd").join(fd), "");
        }
        let p = read_process_with(root.path(), 100, 4096).expect("read");
        assert_eq!((p.cpu_user_seconds, p.cpu_system_seconds), (3.0, 1.0));
        assert_eq!(p.open_fds, Some(5));
        fs::remove_dir_all(me.join("fd")).expect("rm");
        assert_eq!(read_process_with(root.path(), 100, 4096).expect("read").open_fds, None);

        fs::remove_file(me.join("status")).expect("rm");
        let err = read_process_with(root.path(), 100, 4096).expect_err("no status");
        assert!(matches!(&err, ProcError::Read { path, .. } if path.ends_with("self/status")));
        write(&me.join("status"), STATUS);
        write(&me.join("stat"), "garbage");
        let err = read_process_with(root.path(), 100, 4096).expect_err("bad stat");
        assert!(err.to_string().contains("self/stat: no `(comm)`"), "{err}");
    }

    #[test]
    fn threads_are_read_per_task_sorted_by_tid() {
        let root = tempfile::tempdir().expect("tmp");
        let task = root.path().join("self/task");
        write(&task.join("4242/stat"), &stat_line(4242, "edgeinfer", 10, 5, 3, 0));
        write(&task.join("4250/stat"), &stat_line(4250, "infer-1", 900, 100, 3, 3));
        write(&task.join("4245/stat"), &stat_line(4245, "tokio rt (io)", 20, 20, 3, 1));
        write(&task.join("4260/stat"), "4260 (gone"); // exited mid-read: left out
        fs::create_dir_all(task.join("not-a-tid")).expect("mkdir");
        let t = read_threads_with(root.path(), 100);
        let tids: Vec<i32> = t.iter().map(|t| t.tid).collect();
        assert_eq!(tids, [4242, 4245, 4250]);
        assert_eq!(t[1].name, "tokio rt (io)");
        assert_eq!(
            t[2],
            ThreadStats {
                tid: 4250,
                name: "infer-1".into(),
                cpu_seconds: 10.0,
                processor: Some(3)
            }
        );
        assert!(read_threads_with(&root.path().join("nope"), 100).is_empty());
    }

    /// A fake `/sys/devices/system/cpu` with a big.LITTLE-like mix: cpu2 has no cpufreq.
    fn fake_cpus(sys: &Path) {
        let cpu = sys.join("devices/system/cpu");
        for (n, gov, cur) in [(0, "ondemand", "600000"), (1, "ondemand", "1500000")] {
            let d = cpu.join(format!("cpu{n}/cpufreq"));
            write(&d.join("scaling_governor"), &format!("{gov}\n"));
            write(&d.join("scaling_cur_freq"), &format!("{cur}\n"));
            write(&d.join("scaling_min_freq"), "600000\n");
            write(&d.join("scaling_max_freq"), "1500000\n");
            write(&d.join("cpuinfo_max_freq"), "1800000\n");
        }
        fs::create_dir_all(cpu.join("cpu2/topology")).expect("mkdir");
        let d = cpu.join("cpu10/cpufreq");
        write(&d.join("scaling_governor"), "performance\n");
        write(&d.join("scaling_cur_freq"), "<unknown>\n");
        write(&d.join("stats/time_in_state"), "729600 150\n2201600 12345\nbogus\n");
        for other in ["cpufreq", "cpuidle", "online"] {
            fs::create_dir_all(cpu.join(other)).expect("mkdir");
        }
    }

    #[test]
    fn cpufreq_is_read_in_hz_sorted_numerically_skipping_cpus_without_it() {
        let sys = tempfile::tempdir().expect("tmp");
        fake_cpus(sys.path());
        let f = read_cpufreq_with(sys.path(), None, 100);
        let cpus: Vec<usize> = f.iter().map(|c| c.cpu).collect();
        assert_eq!(cpus, [0, 1, 10], "cpu2 has no cpufreq; 10 sorts after 2");
        assert_eq!(f[0].governor.as_deref(), Some("ondemand"));
        assert_eq!(f[0].cur_hz, Some(600_000_000));
        assert_eq!(f[1].cur_hz, Some(1_500_000_000));
        assert_eq!((f[1].min_hz, f[1].max_hz), (Some(600_000_000), Some(1_500_000_000)));
        assert_eq!(f[1].hw_max_hz, Some(1_800_000_000), "capped below the hardware maximum");
        assert!(f[0].time_in_state.is_empty());
        let c10 = &f[2];
        assert_eq!(c10.governor.as_deref(), Some("performance"));
        assert_eq!((c10.cur_hz, c10.max_hz), (None, None));
        assert_eq!(
            c10.time_in_state,
            [
                FreqResidency { hz: 729_600_000, seconds: 1.5 },
                FreqResidency { hz: 2_201_600_000, seconds: 123.45 }
            ]
        );

        let some = read_cpufreq_with(sys.path(), Some(&[10, 1, 2, 7, 1]), 100);
        assert_eq!(some.iter().map(|c| c.cpu).collect::<Vec<_>>(), [1, 10]);
        assert!(read_cpufreq_with(&sys.path().join("vm"), None, 100).is_empty());
    }

    #[test]
    fn thermal_zones_skip_unreadable_sensors_and_find_trip_points() {
        let sys = tempfile::tempdir().expect("tmp");
        let th = sys.path().join("class/thermal");
        let z0 = th.join("thermal_zone0");
        write(&z0.join("type"), "cpu-thermal\n");
        write(&z0.join("temp"), "45678\n");
        write(&z0.join("trip_point_0_type"), "passive\n");
        write(&z0.join("trip_point_0_temp"), "85000\n");
        write(&z0.join("trip_point_1_type"), "passive\n");
        write(&z0.join("trip_point_1_temp"), "80000\n");
        write(&z0.join("trip_point_2_type"), "critical\n");
        write(&z0.join("trip_point_2_temp"), "110000\n");
        write(&z0.join("trip_point_4_type"), "critical\n"); // after a gap: not a trip point
        write(&z0.join("trip_point_4_temp"), "1000\n");
        write(&th.join("thermal_zone1/type"), "gpu-thermal\n");
        write(&th.join("thermal_zone1/temp"), "garbage\n");
        // A sensor that fails the read (the kernel's EINVAL/ENODATA): EISDIR here.
        write(&th.join("thermal_zone2/type"), "soc0-thermal\n");
        fs::create_dir_all(th.join("thermal_zone2/temp")).expect("mkdir");
        write(&th.join("thermal_zone10/type"), "  tj-thermal \n");
        write(&th.join("thermal_zone10/temp"), "-5500\n");
        fs::create_dir_all(th.join("cooling_device0")).expect("mkdir");

        let z = read_thermal(sys.path());
        assert_eq!(
            z,
            [
                ThermalZone {
                    zone: 0,
                    kind: "cpu-thermal".into(),
                    celsius: 45.678,
                    trip_critical_celsius: Some(110.0),
                    trip_passive_celsius: Some(80.0),
                },
                ThermalZone {
                    zone: 10,
                    kind: "tj-thermal".into(),
                    celsius: -5.5,
                    trip_critical_celsius: None,
                    trip_passive_celsius: None,
                },
            ]
        );
        assert!(read_thermal(&sys.path().join("vm")).is_empty());
    }

    #[test]
    fn snapshots_serialize_with_snake_case_fields() {
        let sys = tempfile::tempdir().expect("tmp");
        fake_cpus(sys.path());
        write(&sys.path().join("class/thermal/thermal_zone0/type"), "cpu-thermal\n");
        write(&sys.path().join("class/thermal/thermal_zone0/temp"), "50000\n");
        let host = read_host(sys.path(), Some(&[0]));
        let v = serde_json::to_value(&host).expect("json");
        assert_eq!(v["cpufreq"][0]["cur_hz"], 600_000_000);
        assert_eq!(v["cpufreq"][0]["governor"], "ondemand");
        assert!(v["cpufreq"][0].get("time_in_state").is_none(), "empty is left out");
        assert_eq!(v["thermal"][0]["kind"], "cpu-thermal");
        assert_eq!(v["thermal"][0]["celsius"], 50.0);
        let line = stat_line(1, "x", 1, 1, 1, 0);
        let p = serde_json::to_value(parse_process(&line, STATUS, 100, 4096).expect("p"))
            .expect("json");
        for key in ["cpu_user_seconds", "rss_bytes", "vm_hwm_bytes", "nonvoluntary_ctxt_switches"] {
            assert!(p.get(key).is_some(), "{key} missing in {p}");
        }
    }

    #[test]
    fn oversized_files_are_read_only_up_to_the_cap() {
        let dir = tempfile::tempdir().expect("tmp");
        let big = dir.path().join("big");
        fs::write(&big, vec![b'7'; 3 * MAX_FILE_BYTES as usize]).expect("w");
        assert_eq!(read_capped(&big).expect("read").len() as u64, MAX_FILE_BYTES);
        assert_eq!(read_khz(&big), None, "overflow is None, not a panic");
    }

    #[test]
    fn real_proc_of_this_machine() {
        let p = read_process(Path::new("/proc")).expect("read /proc");
        assert!(p.threads >= 1);
        assert!(p.rss_bytes > 0);
        assert!(p.cpu_user_seconds >= 0.0 && p.cpu_system_seconds >= 0.0);
        assert!(p.vm_hwm_bytes.is_some_and(|h| h >= p.rss_bytes / 2));
        assert!(p.open_fds.is_some_and(|n| n >= 1), "{:?}", p.open_fds);
        let me = super::super::gettid();
        let threads = read_threads(Path::new("/proc"));
        let t = threads.iter().find(|t| t.tid == me).expect("current thread listed");
        assert!(t.cpu_seconds >= 0.0);
        assert!(!threads.is_empty() && threads.windows(2).all(|w| w[0].tid < w[1].tid));
    }

    #[test]
    fn real_sys_of_this_machine_is_well_formed() {
        // May be empty in a VM; only the shape is checked.
        let host = read_host(Path::new("/sys"), None);
        assert!(host.cpufreq.windows(2).all(|w| w[0].cpu < w[1].cpu));
        assert!(host.cpufreq.iter().all(|c| c.cur_hz != Some(0)));
        assert!(host.thermal.windows(2).all(|w| w[0].zone < w[1].zone));
        assert!(host.thermal.iter().all(|z| z.celsius.is_finite()));
        serde_json::to_string(&host).expect("json");
    }
}
