//! Privileges: dropping Linux capabilities to what the config keeps, `PR_SET_NO_NEW_PRIVS`, and
//! verifying the result the way an operator would, from `/proc/self/status`.
//!
//! Capabilities are per thread: this must run on the main thread before any other thread is
//! spawned (threads inherit the sets of the thread that creates them).

use caps::{CapSet, Capability, CapsHashSet};

/// Errors dropping privileges. Each one means the daemon would run with more than it should,
/// so start-up fails.
#[derive(Debug, thiserror::Error)]
pub enum PrivError {
    #[error("unknown capability `{0}` in system.keep_capabilities")]
    Unknown(String),
    #[error(
        "cannot keep {0}: it is not in the permitted set; hint: grant it in the unit \
         (AmbientCapabilities= and CapabilityBoundingSet=)"
    )]
    NotPermitted(String),
    #[error("cannot change the {set} capability set")]
    Set {
        set: &'static str,
        #[source]
        source: caps::errors::CapsError,
    },
    #[error("cannot set no_new_privs")]
    NoNewPrivs(#[source] nix::Error),
    #[error("capabilities still present after dropping: {0}")]
    Verify(String),
}

/// Parses capability names (`CAP_SYS_NICE` or `sys_nice`).
pub fn parse_caps(names: &[String]) -> Result<CapsHashSet, PrivError> {
    names
        .iter()
        .map(|n| {
            let canonical = caps::to_canonical(n);
            canonical.parse::<Capability>().map_err(|_| PrivError::Unknown(n.clone()))
        })
        .collect()
}

/// What the process holds, as `/proc/<pid>/status` reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct ProcStatus {
    pub cap_inh: u64,
    pub cap_prm: u64,
    pub cap_eff: u64,
    pub cap_bnd: u64,
    pub cap_amb: u64,
    pub no_new_privs: bool,
    pub cpus_allowed_list: String,
}

/// Parses the fields we care about from the text of `/proc/<pid>[/task/<tid>]/status`.
pub fn parse_status(text: &str) -> ProcStatus {
    let mut s = ProcStatus::default();
    for line in text.lines() {
        let Some((k, v)) = line.split_once(':') else { continue };
        let v = v.trim();
        let hex = || u64::from_str_radix(v, 16).unwrap_or(u64::MAX);
        match k {
            "CapInh" => s.cap_inh = hex(),
            "CapPrm" => s.cap_prm = hex(),
            "CapEff" => s.cap_eff = hex(),
            "CapBnd" => s.cap_bnd = hex(),
            "CapAmb" => s.cap_amb = hex(),
            "NoNewPrivs" => s.no_new_privs = v == "1",
            "Cpus_allowed_list" => s.cpus_allowed_list = v.to_string(),
            _ => {}
        }
    }
    s
}

pub fn read_status() -> ProcStatus {
    parse_status(&std::fs::read_to_string("/proc/thread-self/status").unwrap_or_default())
}

/// Names of the capabilities in a bit mask (for messages and health).
pub fn names(mask: u64) -> Vec<String> {
    let mut v: Vec<String> = caps::all()
        .into_iter()
        .filter(|c| mask & c.bitmask() != 0)
        .map(|c| c.to_string())
        .collect();
    v.sort();
    v
}

/// The outcome, for the log and the health message.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    pub kept: Vec<String>,
    pub bounding_dropped: bool,
    /// Why the bounding set was left alone, when it was.
    pub note: Option<String>,
    pub status: ProcStatus,
}

/// Keeps only `keep` in the effective and permitted sets, clears the inheritable and ambient
/// sets, drops every other capability from the bounding set when we may (CAP_SETPCAP), sets
/// no_new_privs, and verifies the result from `/proc/thread-self/status`.
pub fn drop_privileges(keep: &CapsHashSet) -> Result<Report, PrivError> {
    let set_err = |set: &'static str| move |source| PrivError::Set { set, source };
    let permitted = caps::read(None, CapSet::Permitted).map_err(set_err("permitted"))?;
    if let Some(missing) = keep.iter().find(|c| !permitted.contains(c)) {
        return Err(PrivError::NotPermitted(missing.to_string()));
    }
    // The bounding set limits what an exec could ever regain; dropping from it needs
    // CAP_SETPCAP, which an unprivileged service user does not have (systemd's
    // CapabilityBoundingSet= has already narrowed it then).
    let effective = caps::read(None, CapSet::Effective).map_err(set_err("effective"))?;
    let (bounding_dropped, note) = if effective.contains(&Capability::CAP_SETPCAP) {
        let bounding = caps::read(None, CapSet::Bounding).map_err(set_err("bounding"))?;
        for c in bounding.iter().filter(|c| !keep.contains(c)) {
            caps::drop(None, CapSet::Bounding, *c).map_err(set_err("bounding"))?;
        }
        (true, None)
    } else {
        (false, Some("no CAP_SETPCAP: bounding set left as the service manager set it".to_string()))
    };
    caps::clear(None, CapSet::Ambient).map_err(set_err("ambient"))?;
    caps::clear(None, CapSet::Inheritable).map_err(set_err("inheritable"))?;
    caps::set(None, CapSet::Effective, keep).map_err(set_err("effective"))?;
    caps::set(None, CapSet::Permitted, keep).map_err(set_err("permitted"))?;
    nix::sys::prctl::set_no_new_privs().map_err(PrivError::NoNewPrivs)?;

    let status = read_status();
    let keep_mask: u64 = keep.iter().map(|c| c.bitmask()).fold(0, |a, b| a | b);
    let extra = (status.cap_eff | status.cap_prm | status.cap_amb | status.cap_inh) & !keep_mask;
    if extra != 0 || !status.no_new_privs {
        return Err(PrivError::Verify(format!(
            "{:?}, no_new_privs={}",
            names(extra),
            status.no_new_privs
        )));
    }
    let mut kept: Vec<String> = keep.iter().map(ToString::to_string).collect();
    kept.sort();
    Ok(Report { kept, bounding_dropped, note, status })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_parsing() {
        let s = parse_status(
            "Name:\tedgeinfer\nCapInh:\t0000000000000000\nCapPrm:\t0000000000800000\nCapEff:\t0000000000800000\n\
             CapBnd:\t000001ffffffffff\nCapAmb:\t0000000000000000\nNoNewPrivs:\t1\nCpus_allowed_list:\t2-3\n",
        );
        assert_eq!(s.cap_eff, 0x800000);
        assert_eq!(names(s.cap_eff), vec!["CAP_SYS_NICE"]);
        assert!(s.no_new_privs);
        assert_eq!(s.cpus_allowed_list, "2-3");
    }

    #[test]
    fn capability_names() {
        let set = parse_caps(&["CAP_SYS_NICE".into(), "net_bind_service".into()]).expect("caps");
        assert!(
            set.contains(&Capability::CAP_SYS_NICE)
                && set.contains(&Capability::CAP_NET_BIND_SERVICE)
        );
        assert!(matches!(parse_caps(&["CAP_FLY".into()]), Err(PrivError::Unknown(_))));
    }

    /// Runs the real drop in a child thread... capabilities are per thread, but no_new_privs is
    /// per thread too and irreversible, so do it in a throwaway thread and inspect that thread.
    #[test]
    fn dropping_everything_leaves_nothing_in_this_thread() {
        std::thread::spawn(|| {
            let report = drop_privileges(&CapsHashSet::new()).expect("drop");
            assert_eq!(report.status.cap_eff, 0);
            assert_eq!(report.status.cap_prm, 0);
            assert_eq!(report.status.cap_amb, 0);
            assert!(report.status.no_new_privs);
            assert!(report.kept.is_empty());
        })
        .join()
        .expect("thread");
    }
}
