//! The system steps of start-up: who we run as, cgroup placement and limits, CPU sets and
//! worker placement, queue sizes from the memory budget, and dropping privileges. Each function
//! is one step of `app::start`; what it decided is kept in [`SystemState`] for health.

use std::path::PathBuf;

use serde_json::{Value, json};

use super::AppError;
use crate::config::{CgroupMode, Config, WorkerSchedConfig};
pub use crate::pipeline::Placement;
use crate::sys::cgroup::{self, Access, CgroupFs, CpuMax, Layout, Plan};
use crate::sys::cpus::{self, CpuList, WorkerSched};
use crate::sys::privs;

/// What the system steps decided, reported in health and `STATUS=`.
#[derive(Debug, Clone, Default)]
pub struct SystemState {
    pub allowed_cpus: CpuList,
    pub io_cpus: CpuList,
    pub inference_cpus: CpuList,
    /// `delegated`, `read-only`, `unavailable` or `off`.
    pub cgroup_mode: &'static str,
    pub cgroup_reason: Option<String>,
    /// The cgroup whose usage we read (the `daemon/` leaf once set up).
    pub cgroup_dir: Option<PathBuf>,
    pub layout: Option<Layout>,
    pub memory_limit: Option<u64>,
    pub privileges: Option<privs::Report>,
}

impl SystemState {
    pub fn to_json(&self) -> Value {
        let stats = self.cgroup_dir.as_deref().map(cgroup::read_stats);
        json!({
            "uid": nix::unistd::geteuid().as_raw(),
            "cpus": {
                "allowed": self.allowed_cpus.to_string(),
                "io": self.io_cpus.to_string(),
                "inference": self.inference_cpus.to_string(),
            },
            "cgroup": {
                "mode": self.cgroup_mode,
                "reason": self.cgroup_reason,
                "path": self.cgroup_dir,
                "applied": self.layout.as_ref().map(|l| l.applied.clone()),
                "skipped": self.layout.as_ref().map(|l| l.skipped.clone()),
                "memory_limit": self.memory_limit,
                "stats": stats,
            },
            "privileges": self.privileges.as_ref().map(|p| json!({
                "kept": p.kept,
                "cap_eff": format!("{:016x}", p.status.cap_eff),
                "cap_prm": format!("{:016x}", p.status.cap_prm),
                "cap_bnd": format!("{:016x}", p.status.cap_bnd),
                "no_new_privs": p.status.no_new_privs,
                "bounding_dropped": p.bounding_dropped,
                "note": p.note,
            })),
        })
    }
}

/// Step: who we run as. Root is refused unless the config allows it.
pub fn check_user(config: &Config) -> Result<(), AppError> {
    if nix::unistd::geteuid().is_root() && !config.system.allow_root {
        return Err(AppError::Root);
    }
    Ok(())
}

/// Step: CPU sets. The allowed set comes from our affinity mask (which the kernel keeps inside
/// the cgroup's `cpuset.cpus.effective`); config picks I/O and inference CPUs within it.
pub fn cpu_sets(config: &Config, state: &mut SystemState) {
    let allowed = cpus::allowed();
    let (io_default, inf_default) = cpus::default_split(&allowed);
    state.io_cpus = config.system.io_cpus.as_deref().map_or(io_default, CpuList::from_slice);
    state.inference_cpus =
        config.system.inference_cpus.as_deref().map_or(inf_default, CpuList::from_slice);
    state.allowed_cpus = allowed;
}

/// Step: cgroup placement and limits. Never fatal for a missing or read-only cgroup (logged
/// once, with the reason); fatal only when a delegated subtree refuses our writes.
pub fn cgroup(config: &Config, state: &mut SystemState) -> Result<(), AppError> {
    let cg = &config.system.cgroup;
    let fs = CgroupFs::new(&cg.root);
    let self_cgroup = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let access = fs.detect(&self_cgroup, nix::unistd::geteuid().as_raw());
    let configured_limit = cg.memory_max.or(cg.memory_high);
    match (cg.mode, access) {
        (_, Access::Unavailable(reason)) => {
            log::info!("cgroup placement and limits skipped: {reason}");
            state.cgroup_mode = "unavailable";
            state.cgroup_reason = Some(reason);
            state.memory_limit = configured_limit;
        }
        (CgroupMode::Off, Access::ReadOnly { dir, .. } | Access::Delegated { dir }) => {
            log::info!("cgroup placement and limits skipped: system.cgroup.mode = \"off\"");
            state.cgroup_mode = "off";
            state.memory_limit =
                configured_limit.or_else(|| cgroup::effective_memory_limit(&cg.root, &dir));
            state.cgroup_dir = Some(dir);
        }
        (CgroupMode::Auto, Access::ReadOnly { dir, reason }) => {
            log::info!(
                "cgroup limits not applied: {reason}; usage of {} is still reported",
                dir.display()
            );
            state.cgroup_mode = "read-only";
            state.cgroup_reason = Some(reason);
            state.memory_limit =
                configured_limit.or_else(|| cgroup::effective_memory_limit(&cg.root, &dir));
            state.cgroup_dir = Some(dir);
        }
        (CgroupMode::Auto, Access::Delegated { dir }) => {
            let plan = Plan {
                memory_high: cg.memory_high,
                memory_max: cg.memory_max,
                io_cpus: state.io_cpus.clone(),
                inference_cpus: worker_cpus(config, state),
                io_cpu_max: cg.io_cpu_max.map(CpuMax::percent),
                inference_cpu_max: cg.inference_cpu_max.map(CpuMax::percent),
            };
            let layout =
                cgroup::setup(&dir, &plan, std::process::id()).map_err(AppError::Cgroup)?;
            log::info!(
                "cgroup {} delegated: process in {}, applied [{}]{}",
                dir.display(),
                layout.daemon.display(),
                layout.applied.join(", "),
                if layout.skipped.is_empty() {
                    String::new()
                } else {
                    format!(", skipped [{}]", layout.skipped.join("; "))
                }
            );
            state.cgroup_mode = "delegated";
            state.memory_limit = configured_limit
                .or_else(|| cgroup::effective_memory_limit(&cg.root, &layout.daemon));
            state.cgroup_dir = Some(layout.daemon.clone());
            state.layout = Some(layout);
        }
    }
    Ok(())
}

/// Every CPU some worker runs on: the inference set plus pipelines' explicit `cpus`.
fn worker_cpus(config: &Config, state: &SystemState) -> CpuList {
    let mut all = state.inference_cpus.0.clone();
    for p in &config.pipelines {
        all.extend(p.cpus.iter().copied());
    }
    CpuList(all)
}

/// Step: size queues from the memory budget. Queued frames may use `queue_memory_fraction` of
/// the memory limit, split evenly between pipelines; a queue that would not fit is shortened
/// (never below one frame) and the change is logged. `frame_bytes[i]` is pipeline i's bytes per
/// queued frame.
pub fn fit_queues(config: &mut Config, frame_bytes: &[usize], state: &SystemState) {
    let Some(limit) = state.memory_limit else { return };
    let budget = (limit as f64 * config.system.cgroup.queue_memory_fraction) as usize;
    let share = budget / config.pipelines.len().max(1);
    for (p, bytes) in config.pipelines.iter_mut().zip(frame_bytes) {
        let fits = (share / (*bytes).max(1)).max(1);
        if fits < p.queue.capacity {
            log::warn!(
                pipeline = p.name.as_str();
                "queue capacity lowered from {} to {fits}: {} frames of {bytes} bytes exceed this pipeline's share ({share} bytes) of the memory limit {limit}",
                p.queue.capacity,
                p.queue.capacity
            );
            p.queue.capacity = fits;
        }
    }
}

/// Where each worker of each pipeline runs: pinned to its CPUs (the pipeline's `cpus` in turn,
/// else the inference set round-robin across all pipelines), with the configured scheduling
/// class, in the inference cgroup leaf when there is one. A worker with `threads = n > 1` gets
/// `n` consecutive CPUs of that list (config validation checked that workers x threads fit).
pub fn placements(config: &Config, state: &SystemState) -> Vec<Vec<Placement>> {
    let sched = match config.system.worker_sched {
        WorkerSchedConfig::Other { nice } => WorkerSched::Other { nice },
        WorkerSchedConfig::Fifo { priority } => WorkerSched::Fifo { priority },
        WorkerSchedConfig::RoundRobin { priority } => WorkerSched::RoundRobin { priority },
    };
    let leaf = state.layout.as_ref().map(|l| l.inference.clone());
    let shared = state.inference_cpus.to_vec();
    let mut next = 0usize;
    config
        .pipelines
        .iter()
        .map(|p| {
            let threads = p.engine.threads.max(1);
            let mut own = 0usize;
            (0..p.workers)
                .map(|_| {
                    let cpus = if !p.cpus.is_empty() {
                        let v = (0..threads).map(|k| p.cpus[(own + k) % p.cpus.len()]).collect();
                        own += threads;
                        v
                    } else if !shared.is_empty() {
                        let v = (0..threads).map(|k| shared[(next + k) % shared.len()]).collect();
                        next += threads;
                        v
                    } else {
                        Vec::new()
                    };
                    Placement { cpus, sched, cgroup_leaf: leaf.clone() }
                })
                .collect()
        })
        .collect()
}

/// Step: CPU affinity of the calling (main) thread: the I/O set. Threads created later (tokio
/// I/O threads, workers) inherit it; workers then move to their own CPU.
pub fn pin_io(state: &SystemState) {
    if !state.io_cpus.is_empty()
        && let Err(e) = cpus::pin_current_thread(&state.io_cpus)
    {
        log::warn!("cannot pin I/O threads to CPUs {}: {e}", state.io_cpus);
    }
}

/// Step: drop capabilities and set no_new_privs (main thread, before any thread is spawned).
pub fn drop_privileges(config: &Config, state: &mut SystemState) -> Result<(), AppError> {
    let keep = privs::parse_caps(&config.system.keep_capabilities).map_err(AppError::Privileges)?;
    let report = privs::drop_privileges(&keep).map_err(AppError::Privileges)?;
    log::info!(
        "privileges dropped: kept [{}], CapEff={:016x}, NoNewPrivs={}{}",
        report.kept.join(", "),
        report.status.cap_eff,
        u8::from(report.status.no_new_privs),
        report.note.as_ref().map(|n| format!(" ({n})")).unwrap_or_default()
    );
    state.privileges = Some(report);
    Ok(())
}
