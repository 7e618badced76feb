//! Hot model swap: the unit workers run ([`ModelSet`]), the golden-output check a candidate must
//! pass, and the record of swaps for health.
//!
//! A swap never touches the hot path's data structures in place: `app` loads, optimizes and warms
//! up a candidate off the hot path, checks it ([`Pipeline::check_candidate`],
//! [`check_golden`]), then installs it whole ([`Pipeline::install`]). Workers compare a
//! generation counter between frames and rebuild their sessions from the new set; frames in
//! flight finish on the old set, which is freed when the last worker lets go of it.
//!
//! Golden pairs ship beside the model: for `models/digits.onnx`, the directory
//! `models/digits.golden/` holds `NNN/input.<name>.bin` and `NNN/output.<name>.bin` (raw
//! little-endian tensors in the model's dtypes and shapes, the layout of the test fixtures'
//! samples). Every output must match within `golden_tolerance * max(1, |reference|)`.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::SystemTime;

use serde::Serialize;

use super::output::unix_us;
use crate::model::{Model, decode_le};

/// One version of a pipeline's model as workers run it.
pub struct ModelSet {
    pub model: Model,
    /// Plans for batched runs, ascending batch size (empty unless `max_batch > 1`).
    pub batched: Vec<Model>,
    /// One label per class (classification post-processing).
    pub labels: Vec<String>,
    /// When it was installed (Unix µs).
    pub loaded_us: u64,
    /// What brought it in: `start-up`, `sighup`, `file`, `command`.
    pub source: String,
    /// An open handle to the file it was loaded from. After a new file is renamed over the old
    /// one, this still reads the old content: a rollback restores the file from it.
    pub file: Option<std::fs::File>,
}

/// Model sets alive in this process: one per pipeline in steady state. A swapped-out set lives
/// on only while a worker still serves a frame with it; more than that after swaps is a leak
/// (reported in health, checked by the swap tests).
static LIVE: AtomicUsize = AtomicUsize::new(0);

/// Model sets alive now (see [`LIVE`]).
pub fn live_model_sets() -> usize {
    LIVE.load(Ordering::Relaxed)
}

impl Drop for ModelSet {
    fn drop(&mut self) {
        LIVE.fetch_sub(1, Ordering::Relaxed);
    }
}

impl ModelSet {
    pub fn new(model: Model, batched: Vec<Model>, labels: Vec<String>, source: &str) -> ModelSet {
        LIVE.fetch_add(1, Ordering::Relaxed);
        ModelSet {
            model,
            batched,
            labels,
            loaded_us: unix_us(SystemTime::now()),
            source: source.into(),
            file: None,
        }
    }

    /// Keeps `file` (the handle the model was read from) for a later rollback.
    pub fn with_file(mut self, file: Option<std::fs::File>) -> Self {
        self.file = file;
        self
    }

    /// Batch sizes with a plan, ascending (1 always).
    pub fn batch_sizes(&self) -> impl Iterator<Item = usize> + '_ {
        std::iter::once(1)
            .chain(self.batched.iter().filter_map(|m| m.inputs.first()?.shape.first().copied()))
    }
}

/// How a swap attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SwapResult {
    /// The candidate is running.
    Swapped,
    /// The file is the model already running (same SHA-256): nothing to do.
    Unchanged,
    /// The candidate failed a check; the running model stays.
    Rejected,
    /// The candidate regressed during probation; the previous model is back.
    RolledBack,
    /// The candidate passed probation; the previous model is released.
    Kept,
}

/// One swap attempt, for health and the event message.
#[derive(Debug, Clone, Serialize)]
pub struct SwapReport {
    pub result: SwapResult,
    pub trigger: String,
    pub at_us: u64,
    /// Load, optimize, warm-up and checks, milliseconds.
    pub duration_ms: f64,
    pub from_version: String,
    pub from_sha256: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub to_version: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub to_sha256: Option<String>,
    /// Golden pairs checked (0: none shipped).
    pub golden_checked: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Per-pipeline swap history.
#[derive(Debug, Default, Clone, Serialize)]
pub struct SwapLog {
    pub swapped: u64,
    pub rejected: u64,
    pub unchanged: u64,
    pub rolled_back: u64,
    pub kept: u64,
    pub last: Option<SwapReport>,
}

impl SwapLog {
    pub fn record(&mut self, r: SwapReport) {
        match r.result {
            SwapResult::Swapped => self.swapped += 1,
            SwapResult::Rejected => self.rejected += 1,
            SwapResult::Unchanged => self.unchanged += 1,
            SwapResult::RolledBack => self.rolled_back += 1,
            SwapResult::Kept => self.kept += 1,
        }
        self.last = Some(r);
    }
}

/// A swapped-in model under watch: the previous set stays loaded until the window ends, so a
/// regression can be undone at once.
pub struct Probation {
    pub previous: std::sync::Arc<ModelSet>,
    pub until: std::time::Instant,
    /// The previous model's inference P99 and error rate over its last stretch of service.
    pub baseline_p99: Option<std::time::Duration>,
    pub baseline_errors: f64,
    /// Statistics when the candidate went in (its window starts here).
    pub inference_at_swap: crate::telemetry::Snapshot,
    pub failed_at_swap: u64,
    /// The swap report this probation follows (from/to versions).
    pub swap: SwapReport,
}

/// Thresholds of a probation verdict.
#[derive(Debug, Clone, Copy)]
pub struct ProbationLimits {
    pub min_frames: u64,
    /// Candidate P99 above this multiple of the baseline's is a regression...
    pub latency_ratio: f64,
    /// ...when it is also this much above it in absolute terms (a 0.1 -> 0.3 ms change on a
    /// shared core is scheduling noise, not a slower model).
    pub latency_floor: std::time::Duration,
    /// Candidate error rate above the baseline's plus this is a regression.
    pub error_rate: f64,
}

/// Whether a candidate with `frames` inferences (latency histogram `since_swap`) and `failed`
/// failed inferences regressed against the baseline; the reason if so. No verdict before
/// `min_frames`.
pub fn probation_verdict(
    since_swap: &crate::telemetry::Snapshot,
    failed: u64,
    baseline_p99: Option<std::time::Duration>,
    baseline_errors: f64,
    limits: &ProbationLimits,
) -> Option<String> {
    let frames = since_swap.count();
    let total = frames + failed;
    if total < limits.min_frames.max(1) {
        return None;
    }
    let errors = failed as f64 / total as f64;
    if errors > baseline_errors + limits.error_rate {
        return Some(format!(
            "inference error rate {:.2}% over {total} frames, {:.2}% before (limit +{:.2}%)",
            errors * 100.0,
            baseline_errors * 100.0,
            limits.error_rate * 100.0
        ));
    }
    let (Some(p99), Some(base)) = (since_swap.quantile(0.99), baseline_p99) else { return None };
    if p99.as_secs_f64() > base.as_secs_f64() * limits.latency_ratio
        && p99.saturating_sub(base) > limits.latency_floor
    {
        return Some(format!(
            "inference P99 {:.1} ms over {frames} frames, {:.1} ms before (limit {}x and +{:.1} ms)",
            p99.as_secs_f64() * 1e3,
            base.as_secs_f64() * 1e3,
            limits.latency_ratio,
            limits.latency_floor.as_secs_f64() * 1e3
        ));
    }
    None
}

/// Puts the previous model file back at `path` from the handle it was loaded through, moving
/// the rejected file aside to `<path>.rejected`. Refuses when the handle no longer holds the
/// previous model (the file was modified in place rather than replaced).
pub fn restore_file(path: &Path, previous: &ModelSet) -> Result<PathBuf, String> {
    use std::io::Seek;
    let mut f = previous
        .file
        .as_ref()
        .ok_or("the previous model's file handle was not kept")?
        .try_clone()
        .map_err(|e| format!("cannot reuse the previous model's file handle: {e}"))?;
    let read_back = |e: std::io::Error| format!("cannot read the previous model back: {e}");
    f.rewind().map_err(read_back)?;
    if crate::sys::fsutil::sha256_hex(&mut f).map_err(read_back)? != previous.model.sha256 {
        return Err("the previous model file was modified in place; it cannot be restored".into());
    }
    f.rewind().map_err(read_back)?;
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let rejected = path.with_file_name(format!("{name}.rejected"));
    let mut restore = || -> std::io::Result<()> {
        // The rejected candidate is kept for inspection (a second name for its inode), then
        // the previous content replaces the model path atomically: the path never goes missing.
        match std::fs::remove_file(&rejected) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        match std::fs::hard_link(path, &rejected) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        crate::sys::fsutil::write_atomic(path, |out| std::io::copy(&mut f, out).map(|_| ()))
    };
    restore().map_err(|e| format!("cannot restore {}: {e}", path.display()))?;
    Ok(rejected)
}

/// Where the golden pairs of `model_path` live: `<dir>/<stem>.golden/`.
pub fn golden_dir(model_path: &Path) -> PathBuf {
    let stem = model_path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    model_path.with_file_name(format!("{stem}.golden"))
}

/// Largest golden pair read (a corrupt or hostile file cannot make us allocate more).
const MAX_GOLDEN_BYTES: u64 = 64 << 20;
/// Pairs checked at most.
const MAX_GOLDEN_PAIRS: usize = 64;

/// Runs every golden pair shipped beside `model_path` through `model` and compares outputs.
/// Returns how many pairs were checked (0 when there is no golden directory); an error names
/// the pair, the output and the worst element.
pub fn check_golden(model: &Model, model_path: &Path, tolerance: f64) -> Result<usize, String> {
    let dir = golden_dir(model_path);
    let Ok(entries) = std::fs::read_dir(&dir) else { return Ok(0) };
    let mut pairs: Vec<PathBuf> =
        entries.filter_map(|e| e.ok()).map(|e| e.path()).filter(|p| p.is_dir()).collect();
    pairs.sort();
    if pairs.len() > MAX_GOLDEN_PAIRS {
        return Err(format!("{}: more than {MAX_GOLDEN_PAIRS} golden pairs", dir.display()));
    }
    let read = |p: PathBuf| -> Result<Vec<u8>, String> {
        let len = std::fs::metadata(&p).map_err(|e| format!("{}: {e}", p.display()))?.len();
        if len > MAX_GOLDEN_BYTES {
            return Err(format!(
                "{}: {len} bytes is more than a golden pair may hold",
                p.display()
            ));
        }
        std::fs::read(&p).map_err(|e| format!("{}: {e}", p.display()))
    };
    let mut session = model.session().map_err(|e| e.to_string())?;
    for pair in &pairs {
        let name = pair.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        for (i, spec) in model.inputs.iter().enumerate() {
            let bytes = read(pair.join(format!("input.{}.bin", spec.name)))?;
            let dst = session.input_mut(i);
            if dst.len() != bytes.len() {
                return Err(format!(
                    "golden pair {name}: input `{}` has {} bytes, the model takes {}",
                    spec.name,
                    bytes.len(),
                    dst.len()
                ));
            }
            dst.copy_from_slice(&bytes);
        }
        session.run().map_err(|e| format!("golden pair {name}: {e}"))?;
        for (i, spec) in model.outputs.iter().enumerate() {
            let want = read(pair.join(format!("output.{}.bin", spec.name)))?;
            let got = session.output(i).ok_or_else(|| format!("no output {i}"))?;
            let dt = spec.dtype;
            if got.bytes().len() != want.len() {
                return Err(format!(
                    "golden pair {name}: output `{}` has {} bytes, the reference {}",
                    spec.name,
                    got.bytes().len(),
                    want.len()
                ));
            }
            let mut worst = (0.0f64, 0usize, 0.0, 0.0);
            for (k, w) in want.chunks_exact(dt.size()).enumerate() {
                let (g, w) = (got.get_f64(k).unwrap_or(f64::NAN), decode_le(dt, w));
                let err = (g - w).abs() / w.abs().max(1.0);
                if err.is_nan() || err > worst.0 {
                    worst = (if err.is_nan() { f64::INFINITY } else { err }, k, g, w);
                }
            }
            if worst.0 > tolerance {
                return Err(format!(
                    "golden pair {name}: output `{}` element {} is {} where the reference is {} \
                     (relative error {:.2e} > golden_tolerance {tolerance:e})",
                    spec.name, worst.1, worst.2, worst.3, worst.0
                ));
            }
        }
    }
    Ok(pairs.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::LoadOptions;

    fn fixture(rel: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/models").join(rel)
    }

    /// A model file with golden pairs copied from a fixture's samples.
    fn staged(model_case: &str, golden_case: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("m.onnx");
        std::fs::copy(fixture(&format!("{model_case}/model.onnx")), &path).expect("copy");
        let golden = golden_dir(&path);
        for i in 0..3 {
            let src = fixture(&format!("{golden_case}/samples/{i:03}"));
            let dst = golden.join(format!("{i:03}"));
            std::fs::create_dir_all(&dst).expect("mkdir");
            for e in std::fs::read_dir(&src).expect("samples") {
                let e = e.expect("entry");
                std::fs::copy(e.path(), dst.join(e.file_name())).expect("copy");
            }
        }
        (dir, path)
    }

    fn load(path: &Path) -> Model {
        Model::load(path, &LoadOptions::default()).expect("model")
    }

    #[test]
    fn probation_verdicts() {
        use crate::telemetry::Histogram;
        use std::time::Duration;
        let limits = ProbationLimits {
            min_frames: 20,
            latency_ratio: 1.5,
            latency_floor: Duration::from_millis(1),
            error_rate: 0.01,
        };
        // 3x slower but only by 0.2 ms: noise on a shared core, not a verdict.
        let tiny = Histogram::default();
        for _ in 0..40 {
            tiny.record(Duration::from_micros(300));
        }
        let small_base = Some(Duration::from_micros(100));
        assert_eq!(probation_verdict(&tiny.snapshot(), 0, small_base, 0.0, &limits), None);
        let h = Histogram::default();
        for _ in 0..10 {
            h.record(Duration::from_millis(30));
        }
        let base = Some(Duration::from_millis(10));
        assert_eq!(probation_verdict(&h.snapshot(), 0, base, 0.0, &limits), None, "too few frames");
        for _ in 0..30 {
            h.record(Duration::from_millis(30));
        }
        let why = probation_verdict(&h.snapshot(), 0, base, 0.0, &limits).expect("regression");
        assert!(why.contains("P99") && why.contains("10.0 ms before"), "{why}");
        assert_eq!(
            probation_verdict(&h.snapshot(), 0, Some(Duration::from_millis(25)), 0.0, &limits),
            None
        );
        assert_eq!(probation_verdict(&h.snapshot(), 0, None, 0.0, &limits), None, "no baseline");
        let why = probation_verdict(&h.snapshot(), 2, None, 0.0, &limits).expect("errors");
        assert!(why.contains("error rate"), "{why}");
        assert_eq!(
            probation_verdict(&h.snapshot(), 2, None, 0.05, &limits),
            None,
            "as bad as before"
        );
    }

    #[test]
    fn a_replaced_file_is_restored_from_the_old_handle() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("m.onnx");
        std::fs::copy(fixture("digits/model.onnx"), &path).expect("copy");
        let handle = std::fs::File::open(&path).expect("open");
        let set = ModelSet::new(load(&path), vec![], vec![], "test").with_file(Some(handle));
        // A new file renamed over the old one.
        let tmp = dir.path().join("m.onnx.tmp");
        std::fs::copy(fixture("digits_v2/model.onnx"), &tmp).expect("copy");
        std::fs::rename(&tmp, &path).expect("rename");
        let rejected = restore_file(&path, &set).expect("restore");
        assert_eq!(
            std::fs::read(&path).expect("read"),
            std::fs::read(fixture("digits/model.onnx")).expect("v1")
        );
        assert_eq!(
            std::fs::read(&rejected).expect("read"),
            std::fs::read(fixture("digits_v2/model.onnx")).expect("v2")
        );
        // Without the handle there is nothing to restore from.
        let bare = ModelSet::new(load(&path), vec![], vec![], "test");
        assert!(restore_file(&path, &bare).is_err());
    }

    #[test]
    fn golden_dir_is_beside_the_model() {
        assert_eq!(golden_dir(Path::new("/m/digits.onnx")), PathBuf::from("/m/digits.golden"));
    }

    #[test]
    fn matching_golden_pairs_pass_and_a_retrained_model_fails_them() {
        let (_d, path) = staged("digits", "digits");
        assert_eq!(check_golden(&load(&path), &path, 1e-4), Ok(3));
        // The v2 weights against v1's reference outputs.
        let (_d2, path2) = staged("digits_v2", "digits");
        let err = check_golden(&load(&path2), &path2, 1e-4).expect_err("mismatch");
        assert!(err.contains("golden pair 000") && err.contains("probabilities"), "{err}");
        // With its own references it passes.
        let (_d3, path3) = staged("digits_v2", "digits_v2");
        assert_eq!(check_golden(&load(&path3), &path3, 1e-4), Ok(3));
    }

    #[test]
    fn no_golden_directory_checks_nothing_and_bad_pairs_are_errors() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("m.onnx");
        std::fs::copy(fixture("digits/model.onnx"), &path).expect("copy");
        let m = load(&path);
        assert_eq!(check_golden(&m, &path, 1e-4), Ok(0));
        // A pair with a truncated input.
        let pair = golden_dir(&path).join("000");
        std::fs::create_dir_all(&pair).expect("mkdir");
        std::fs::write(pair.join("input.pixels.bin"), [0u8; 7]).expect("write");
        let err = check_golden(&m, &path, 1e-4).expect_err("short input");
        assert!(err.contains("has 7 bytes"), "{err}");
        // A pair missing its output.
        std::fs::write(pair.join("input.pixels.bin"), [0u8; 256]).expect("write");
        let err = check_golden(&m, &path, 1e-4).expect_err("missing output");
        assert!(err.contains("output.probabilities.bin"), "{err}");
    }
}
