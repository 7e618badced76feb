//! CPU sets: the kernel's list format (`0-3,5`), the set this process may run on, pinning the
//! calling thread, and worker scheduling (nice, SCHED_FIFO/RR).

use std::collections::BTreeSet;
use std::fmt;

use nix::sched::{CpuSet, sched_getaffinity, sched_setaffinity};
use nix::unistd::Pid;

/// A set of CPU numbers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CpuList(pub BTreeSet<usize>);

impl CpuList {
    /// Parses the kernel's list format: `0-3,5,7-8`, whitespace around it ignored, empty = none.
    pub fn parse(s: &str) -> Result<CpuList, String> {
        let mut out = BTreeSet::new();
        for part in s.trim().split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (lo, hi) = match part.split_once('-') {
                Some((a, b)) => (a.trim(), b.trim()),
                None => (part, part),
            };
            let lo: usize =
                lo.parse().map_err(|_| format!("`{part}` is not a CPU number or range"))?;
            let hi: usize =
                hi.parse().map_err(|_| format!("`{part}` is not a CPU number or range"))?;
            if lo > hi || hi >= 4096 {
                return Err(format!("`{part}` is not a valid CPU range"));
            }
            out.extend(lo..=hi);
        }
        Ok(CpuList(out))
    }

    pub fn from_slice(cpus: &[usize]) -> CpuList {
        CpuList(cpus.iter().copied().collect())
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn contains(&self, cpu: usize) -> bool {
        self.0.contains(&cpu)
    }

    pub fn iter(&self) -> impl Iterator<Item = usize> + '_ {
        self.0.iter().copied()
    }

    pub fn is_subset(&self, other: &CpuList) -> bool {
        self.0.is_subset(&other.0)
    }

    pub fn to_vec(&self) -> Vec<usize> {
        self.0.iter().copied().collect()
    }

    fn to_cpuset(&self) -> nix::Result<CpuSet> {
        let mut set = CpuSet::new();
        for c in &self.0 {
            set.set(*c)?;
        }
        Ok(set)
    }
}

/// Formats in the kernel's list format, compressing runs: `0-3,5`.
impl fmt::Display for CpuList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let v: Vec<usize> = self.to_vec();
        let mut i = 0;
        let mut first = true;
        while i < v.len() {
            let mut j = i;
            while j + 1 < v.len() && v[j + 1] == v[j] + 1 {
                j += 1;
            }
            if !first {
                f.write_str(",")?;
            }
            first = false;
            if j > i {
                write!(f, "{}-{}", v[i], v[j])?
            } else {
                write!(f, "{}", v[i])?
            }
            i = j + 1;
        }
        Ok(())
    }
}

/// CPUs this process may run on (its affinity mask, which the kernel keeps within the cgroup's
/// `cpuset.cpus.effective`).
pub fn allowed() -> CpuList {
    match sched_getaffinity(Pid::from_raw(0)) {
        Ok(set) => {
            CpuList((0..CpuSet::count()).filter(|c| set.is_set(*c).unwrap_or(false)).collect())
        }
        Err(_) => CpuList::default(),
    }
}

/// Splits the allowed CPUs into an I/O set and an inference set: the first CPU serves MQTT I/O
/// and the rest run inference; with a single CPU both share it.
pub fn default_split(allowed: &CpuList) -> (CpuList, CpuList) {
    let v = allowed.to_vec();
    match v.len() {
        0 => (CpuList::default(), CpuList::default()),
        1 => (allowed.clone(), allowed.clone()),
        _ => (CpuList::from_slice(&v[..1]), CpuList::from_slice(&v[1..])),
    }
}

/// Pins the calling thread (affinity is per thread on Linux) to `cpus`.
pub fn pin_current_thread(cpus: &CpuList) -> nix::Result<()> {
    sched_setaffinity(Pid::from_raw(0), &cpus.to_cpuset()?)
}

/// Scheduling class for worker threads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerSched {
    /// SCHED_OTHER with a nice value (-20..19; below 0 needs CAP_SYS_NICE).
    Other { nice: i32 },
    /// SCHED_FIFO with a real-time priority 1..99 (needs CAP_SYS_NICE).
    Fifo { priority: u8 },
    /// SCHED_RR with a real-time priority 1..99 (needs CAP_SYS_NICE).
    RoundRobin { priority: u8 },
}

/// Applies `sched` to the calling thread.
pub fn set_current_thread_sched(sched: WorkerSched) -> Result<(), String> {
    use thread_priority::{
        RealtimeThreadSchedulePolicy, ThreadPriority, ThreadPriorityValue, ThreadSchedulePolicy,
        set_thread_priority_and_policy, thread_native_id,
    };
    match sched {
        WorkerSched::Other { nice: 0 } => Ok(()),
        WorkerSched::Other { nice } => {
            // `None` means the calling thread: Linux keeps nice values per thread.
            rustix::process::setpriority_process(None, nice)
                .map_err(|e| format!("setpriority({nice}): {e}"))
        }
        WorkerSched::Fifo { priority } | WorkerSched::RoundRobin { priority } => {
            let policy = if matches!(sched, WorkerSched::Fifo { .. }) {
                RealtimeThreadSchedulePolicy::Fifo
            } else {
                RealtimeThreadSchedulePolicy::RoundRobin
            };
            // For real-time policies the cross-platform value (0..99) is the POSIX priority.
            let value = ThreadPriorityValue::try_from(priority)
                .map_err(|e| format!("priority {priority}: {e}"))?;
            set_thread_priority_and_policy(
                thread_native_id(),
                ThreadPriority::Crossplatform(value),
                ThreadSchedulePolicy::Realtime(policy),
            )
            .map_err(|e| format!("{e:?}"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_formats_kernel_lists() {
        let l = CpuList::parse("0-3,5, 7-8\n").expect("list");
        assert_eq!(l.to_vec(), vec![0, 1, 2, 3, 5, 7, 8]);
        assert_eq!(l.to_string(), "0-3,5,7-8");
        assert_eq!(CpuList::parse("").expect("empty"), CpuList::default());
        assert_eq!(CpuList::parse("2").expect("one").to_string(), "2");
        for bad in ["a", "3-1", "1-", "0-99999", "1,,x"] {
            assert!(CpuList::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn default_split_reserves_one_cpu_for_io() {
        let four = CpuList::parse("0-3").expect("list");
        let (io, inf) = default_split(&four);
        assert_eq!((io.to_string(), inf.to_string()), ("0".into(), "1-3".into()));
        let one = CpuList::parse("2").expect("list");
        assert_eq!(default_split(&one), (one.clone(), one));
        let gappy = CpuList::parse("1,3,5").expect("list");
        assert_eq!(default_split(&gappy).1.to_string(), "3,5");
    }

    #[test]
    fn this_process_has_an_allowed_set_and_can_pin_within_it() {
        let a = allowed();
        assert!(!a.is_empty());
        let first = CpuList::from_slice(&[a.iter().next().expect("cpu")]);
        std::thread::spawn(move || {
            pin_current_thread(&first).expect("pin");
            assert_eq!(allowed(), first);
        })
        .join()
        .expect("thread");
    }
}
