//! Hot model swap: what triggers it (SIGHUP, a change of the model file, an MQTT command) and
//! the swap itself, run on its own thread so the serving loop never waits for a model to load.
//!
//! A swap: hash the file (the model already running: `unchanged`) -> load, optimize and warm up
//! the candidate with its batched plans and labels -> same signature and a fitting
//! post-processing ([`Pipeline::check_candidate`]) -> the golden pairs shipped beside it
//! ([`swap::check_golden`]) -> install. Any failure leaves the running model in place and is
//! reported (`rejected`, with the reason) in health, in the log and as an event message.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use super::App;
use crate::pipeline::output::unix_us;
use crate::pipeline::swap::{self, Probation, ProbationLimits, SwapReport, SwapResult};
use crate::pipeline::{ModelSet, Pipeline};
use crate::sys::fsutil;

/// Formats an error with its source chain on one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

/// Opens the model file and hashes it through the handle (which the set keeps for a rollback).
fn open_and_hash(path: &Path) -> Result<(std::fs::File, String), String> {
    use std::io::Seek;
    let err = |e: std::io::Error| format!("cannot read {}: {e}", path.display());
    let mut f = std::fs::File::open(path).map_err(err)?;
    let sha = fsutil::sha256_hex(&mut f).map_err(err)?;
    f.rewind().map_err(err)?;
    Ok((f, sha))
}

/// Loads, checks and installs the model file of pipeline `idx`, or a `staged` OTA delivery,
/// which is put in place of the model file only once every check passed (a refused one is
/// deleted: a restart serves the previous model). Blocking: seconds for a large model. Records
/// the outcome in the pipeline's swap log and returns it.
pub(super) fn reload(
    app: &App,
    idx: usize,
    trigger: &str,
    staged: Option<PathBuf>,
) -> Option<SwapReport> {
    let p = app.pipelines.get(idx)?;
    let pc = &p.cfg;
    let t = Instant::now();
    let cur = p.models();
    let mut report = SwapReport {
        result: SwapResult::Rejected,
        trigger: trigger.to_string(),
        at_us: unix_us(SystemTime::now()),
        duration_ms: 0.0,
        from_version: cur.model.version.clone(),
        from_sha256: cur.model.sha256.clone(),
        to_version: None,
        to_sha256: None,
        golden_checked: 0,
        reason: None,
    };
    let cache = app.config.system.cache_dir();
    let outcome = candidate(p, trigger, &cur, cache.as_deref(), &mut report, staged.as_deref());
    drop(cur);
    // An accepted delivery goes in place before it runs: a restart then loads what runs.
    let outcome = match (outcome, &staged) {
        (Ok(Some(set)), Some(file)) => crate::ota::place(file, &pc.model).map(|()| Some(set)),
        (o, _) => o,
    };
    match outcome {
        Ok(None) => report.result = SwapResult::Unchanged,
        Ok(Some(set)) => {
            report.result = SwapResult::Swapped;
            install_with_probation(p, set, &report);
        }
        Err(reason) => report.reason = Some(reason),
    }
    if let Some(file) = &staged
        && report.result != SwapResult::Swapped
    {
        // Refused (or already running): the model file was never touched.
        let _ = std::fs::remove_file(file);
    }
    report.duration_ms = t.elapsed().as_secs_f64() * 1e3;
    match report.result {
        SwapResult::Swapped => log::info!(
            pipeline = pc.name.as_str();
            "model swapped ({trigger}): version {} -> {}, sha256 {} -> {}, {} golden pair(s) checked, {:.0} ms off the hot path",
            report.from_version,
            report.to_version.as_deref().unwrap_or("?"),
            &report.from_sha256[..12.min(report.from_sha256.len())],
            report.to_sha256.as_deref().map_or("?", |s| &s[..12.min(s.len())]),
            report.golden_checked,
            report.duration_ms
        ),
        SwapResult::Unchanged => log::info!(
            pipeline = pc.name.as_str();
            "model reload ({trigger}): {} is the model already running; nothing to do",
            pc.model.display()
        ),
        SwapResult::Rejected => log::error!(
            pipeline = pc.name.as_str();
            "model candidate rejected ({trigger}): {}; still serving version {}",
            report.reason.as_deref().unwrap_or("?"),
            report.from_version
        ),
        // Only probation ends in these (check_probation).
        SwapResult::RolledBack | SwapResult::Kept => {}
    }
    if let Ok(mut g) = p.swaps.lock() {
        g.record(report.clone());
    }
    Some(report)
}

/// The checked candidate (the model file, or `staged` when given), `None` when it is the
/// running model, or why it is refused.
fn candidate(
    p: &Pipeline,
    trigger: &str,
    cur: &ModelSet,
    cache: Option<&Path>,
    report: &mut SwapReport,
    staged: Option<&Path>,
) -> Result<Option<ModelSet>, String> {
    let pc = &p.cfg;
    let source = staged.unwrap_or(&pc.model);
    let (file, sha) = open_and_hash(source)?;
    report.to_sha256 = Some(sha.clone());
    if sha == cur.model.sha256 {
        return Ok(None);
    }
    let loaded = match staged {
        // The staged file under the pipeline's configuration (labels, golden pairs and the
        // model cache are the pipeline's own; only the file differs).
        Some(file) => {
            let mut spc = pc.clone();
            spc.model = file.to_path_buf();
            super::load_pipeline(&spc, cache)
        }
        None => super::load_pipeline(pc, cache),
    };
    let (mut model, labels, batched) = loaded.map_err(|e| chain(&e))?;
    // Where it will run from once accepted.
    model.path = pc.model.clone();
    report.to_version = Some(model.version.clone());
    report.to_sha256 = Some(model.sha256.clone());
    if model.sha256 != sha {
        // Replaced again between hashing and loading: the next trigger loads the newest.
        return Err(
            "the file changed while it was being loaded; the next change event reloads it".into()
        );
    }
    let set = ModelSet::new(model, batched, labels, trigger).with_file(Some(file));
    p.check_candidate(&set)?;
    let checked = swap::check_golden(&set.model, &pc.model, pc.golden_tolerance)?;
    report.golden_checked = checked;
    if checked == 0 && pc.require_golden {
        return Err(format!(
            "no golden pairs in {} and require_golden = true",
            swap::golden_dir(&pc.model).display()
        ));
    }
    Ok(Some(set))
}

/// Installs a checked candidate. With `probation` configured the previous set stays loaded and
/// the candidate is compared with the previous model's record until the window ends.
fn install_with_probation(p: &Pipeline, set: ModelSet, report: &SwapReport) {
    use crate::telemetry::FailReason;
    let now_hist = p.stats.inference.snapshot();
    let now_failed = p.stats.failed(FailReason::Inference);
    let (baseline_p99, baseline_errors) = {
        let mut mark = p.install_mark.lock().unwrap_or_else(|e| e.into_inner());
        let record = now_hist.since(&mark.0);
        let failed = now_failed.saturating_sub(mark.1);
        let total = record.count() + failed;
        *mark = (now_hist.clone(), now_failed);
        (
            (record.count() >= 20).then(|| record.quantile(0.99)).flatten(),
            if total > 0 { failed as f64 / total as f64 } else { 0.0 },
        )
    };
    let previous = p.install(set);
    let mut g = p.probation.lock().unwrap_or_else(|e| e.into_inner());
    // A swap during another probation ends it: the model that was on probation is the one
    // being replaced, and the comparison restarts against it.
    *g = (!p.cfg.probation.is_zero()).then(|| Probation {
        previous,
        until: Instant::now() + p.cfg.probation,
        baseline_p99,
        baseline_errors,
        inference_at_swap: now_hist,
        failed_at_swap: now_failed,
        swap: report.clone(),
    });
}

/// Checks a pipeline's probation (called by the control step): rolls back a regression, ends
/// a probation that passed. Returns the report when it ended either way.
pub(super) fn check_probation(p: &Pipeline) -> Option<SwapReport> {
    use crate::telemetry::FailReason;
    let mut g = p.probation.lock().unwrap_or_else(|e| e.into_inner());
    let pr = g.as_ref()?;
    let since = p.stats.inference.snapshot().since(&pr.inference_at_swap);
    let failed = p.stats.failed(FailReason::Inference).saturating_sub(pr.failed_at_swap);
    let limits = ProbationLimits {
        min_frames: p.cfg.probation_min_frames,
        latency_ratio: p.cfg.probation_latency_ratio,
        latency_floor: p.cfg.probation_latency_floor,
        error_rate: p.cfg.probation_error_rate,
    };
    let verdict =
        swap::probation_verdict(&since, failed, pr.baseline_p99, pr.baseline_errors, &limits);
    if verdict.is_none() && Instant::now() < pr.until {
        return None;
    }
    let pr = g.take()?;
    drop(g);
    let mut report = pr.swap.clone();
    report.at_us = unix_us(SystemTime::now());
    report.trigger = "probation".into();
    match verdict {
        None => {
            report.result = SwapResult::Kept;
            log::info!(
                pipeline = p.name();
                "model version {} passed probation ({} frames); version {} released",
                report.to_version.as_deref().unwrap_or("?"),
                since.count(),
                report.from_version
            );
        }
        Some(reason) => {
            report.result = SwapResult::RolledBack;
            let previous = Arc::clone(&pr.previous);
            // The marks move too: the restored model's record starts again now.
            *p.install_mark.lock().unwrap_or_else(|e| e.into_inner()) =
                (p.stats.inference.snapshot(), p.stats.failed(FailReason::Inference));
            let rejected_set = p.install_arc(previous);
            drop(rejected_set);
            let restored = swap::restore_file(&p.cfg.model, &pr.previous);
            let file_note = match &restored {
                Ok(aside) => {
                    format!("previous file restored, rejected one kept as {}", aside.display())
                }
                Err(e) => format!(
                    "{e}: the file on disk is still the rejected model, a restart would load it"
                ),
            };
            let level = if restored.is_ok() { log::Level::Warn } else { log::Level::Error };
            log::log!(
                level,
                "pipeline {}: model version {} rolled back to {} during probation: {reason}; {file_note}",
                p.name(),
                report.to_version.as_deref().unwrap_or("?"),
                report.from_version
            );
            report.reason = Some(format!("{reason}; {file_note}"));
        }
    }
    if let Ok(mut log) = p.swaps.lock() {
        log.record(report.clone());
    }
    Some(report)
}

/// Runs reloads on a thread of their own, one at a time per pipeline, and hands each report to
/// `done` (the serving loop publishes it).
pub(super) struct Reloader {
    slots: Vec<Arc<Slot>>,
}

/// Per pipeline: whether a reload runs, whether another trigger came in meanwhile, and a staged
/// OTA delivery waiting for it.
#[derive(Default)]
struct Slot {
    running: AtomicBool,
    again: AtomicBool,
    staged: std::sync::Mutex<Option<PathBuf>>,
}

impl Reloader {
    pub(super) fn new(app: &App) -> Self {
        Reloader { slots: app.pipelines.iter().map(|_| Arc::default()).collect() }
    }

    /// Starts a reload of pipeline `idx` from a verified OTA delivery staged in `file`.
    pub(super) fn start_staged(
        &self,
        app: &Arc<App>,
        idx: usize,
        file: PathBuf,
        done: tokio::sync::mpsc::UnboundedSender<SwapReportFor>,
    ) {
        let Some(slot) = self.slots.get(idx) else {
            let _ = std::fs::remove_file(&file);
            return;
        };
        let old = slot.staged.lock().unwrap_or_else(|e| e.into_inner()).replace(file);
        if let Some(old) = old {
            // A newer delivery arrived before the swap took the older one.
            let _ = std::fs::remove_file(old);
        }
        self.start(app, idx, "ota", done);
    }

    /// Starts a reload of pipeline `idx`. While one is running, further triggers are folded
    /// into one more run after it (the file may have changed again while it was loading).
    pub(super) fn start(
        &self,
        app: &Arc<App>,
        idx: usize,
        trigger: &'static str,
        done: tokio::sync::mpsc::UnboundedSender<SwapReportFor>,
    ) {
        let Some(slot) = self.slots.get(idx) else { return };
        if slot.running.swap(true, Ordering::AcqRel) {
            slot.again.store(true, Ordering::Release);
            return;
        }
        let (app, slot) = (Arc::clone(app), Arc::clone(slot));
        let thread_slot = Arc::clone(&slot);
        let spawned = std::thread::Builder::new().name("ei-reload".into()).spawn(move || {
            let slot = thread_slot;
            loop {
                let staged = slot.staged.lock().unwrap_or_else(|e| e.into_inner()).take();
                let trigger = if staged.is_some() { "ota" } else { trigger };
                if let Some(r) = reload(&app, idx, trigger, staged) {
                    let _ = done.send(SwapReportFor { pipeline: idx, report: r });
                }
                slot.running.store(false, Ordering::Release);
                // Another trigger meanwhile: run again, unless a new thread took over.
                if !slot.again.swap(false, Ordering::AcqRel)
                    || slot.running.swap(true, Ordering::AcqRel)
                {
                    break;
                }
            }
        });
        if let Err(e) = spawned {
            slot.running.store(false, Ordering::Release);
            log::error!("cannot start a reload thread: {e}");
        }
    }
}

/// A finished swap attempt of one pipeline.
pub(super) struct SwapReportFor {
    pub pipeline: usize,
    pub report: SwapReport,
}

/// Watches the model files of pipelines with `watch_model` (inotify on their directories, since
/// an atomic rename replaces the file's inode) and sends the pipeline index once a file has been
/// quiet for `debounce`. Runs on its own thread for the life of the process.
pub(super) fn watch(
    app: &App,
    debounce: Duration,
    tx: tokio::sync::mpsc::UnboundedSender<usize>,
) -> Result<(), String> {
    use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
    let targets: Vec<(usize, PathBuf)> = app
        .pipelines
        .iter()
        .enumerate()
        .filter(|(_, p)| p.cfg.watch_model)
        .map(|(i, p)| (i, p.cfg.model.clone()))
        .collect();
    if targets.is_empty() {
        return Ok(());
    }
    let ino = Inotify::init(InitFlags::IN_CLOEXEC | InitFlags::IN_NONBLOCK)
        .map_err(|e| format!("inotify: {e}"))?;
    let mut dirs: Vec<PathBuf> = Vec::new();
    for (_, path) in &targets {
        let dir = path.parent().map_or_else(|| PathBuf::from("."), Path::to_path_buf);
        if !dirs.contains(&dir) {
            ino.add_watch(
                &dir,
                AddWatchFlags::IN_CLOSE_WRITE
                    | AddWatchFlags::IN_MOVED_TO
                    | AddWatchFlags::IN_CREATE,
            )
            .map_err(|e| format!("cannot watch {}: {e}", dir.display()))?;
            dirs.push(dir);
        }
    }
    log::info!(
        "watching model files for changes: {}",
        targets.iter().map(|(_, p)| p.display().to_string()).collect::<Vec<_>>().join(", ")
    );
    std::thread::Builder::new()
        .name("ei-watch".into())
        .spawn(move || watch_loop(ino, targets, debounce, tx))
        .map_err(|e| format!("cannot start the watch thread: {e}"))?;
    Ok(())
}

fn watch_loop(
    ino: nix::sys::inotify::Inotify,
    targets: Vec<(usize, PathBuf)>,
    debounce: Duration,
    tx: tokio::sync::mpsc::UnboundedSender<usize>,
) {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    use std::os::fd::AsFd;
    // Pending changes: pipeline -> when the last event for its file came. A file is reloaded
    // once it has been quiet for `debounce` (a copy is many writes; a rename is one event).
    let mut pending: Vec<(usize, Instant)> = Vec::new();
    loop {
        let next_due = pending.iter().map(|(_, at)| *at + debounce).min();
        let timeout = match next_due {
            None => PollTimeout::NONE,
            Some(due) => {
                let ms = due.saturating_duration_since(Instant::now()).as_millis();
                PollTimeout::try_from(Duration::from_millis(ms.min(60_000) as u64))
                    .unwrap_or(PollTimeout::MAX)
            }
        };
        let mut fds = [PollFd::new(ino.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, timeout) {
            Ok(0) => {}
            Ok(_) => match ino.read_events() {
                Ok(events) => {
                    let now = Instant::now();
                    for ev in events {
                        let Some(name) = ev.name else { continue };
                        for (idx, path) in &targets {
                            if path.file_name() == Some(name.as_os_str()) {
                                pending.retain(|(i, _)| i != idx);
                                pending.push((*idx, now));
                            }
                        }
                    }
                }
                Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR) => {}
                Err(e) => {
                    log::error!("model file watch stopped: {e}; SIGHUP still reloads");
                    return;
                }
            },
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => {
                log::error!("model file watch stopped: {e}; SIGHUP still reloads");
                return;
            }
        }
        let now = Instant::now();
        let (due, rest): (Vec<_>, Vec<_>) =
            pending.into_iter().partition(|(_, at)| *at + debounce <= now);
        pending = rest;
        for (idx, _) in due {
            if tx.send(idx).is_err() {
                return;
            }
        }
    }
}
