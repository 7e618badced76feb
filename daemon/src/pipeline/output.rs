//! Result and error messages: what a pipeline publishes, serialized into reused buffers.
//!
//! Result message (JSON, one per served frame, on the pipeline's output topic):
//! `{"pipeline", "model": {"name","version","sha256"}, "topic", "frame", "seq"?, "ts"?,
//!   "received_us", "timing_us": {"queue","inference","total"},
//!   "outputs": [{"name","dtype","shape","data"}], "top_k"?: [{"index","label","score"}],
//!   "image"?: {"width","height"}, "detections"?: [{"class","label","score","box"}]}`.
//! Error message (on the error topic): `{"pipeline","topic","reason","detail","seq"?,"at_us"}`.
//! Both formats are documented in `docs/messages.md`.

use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;
use serde::ser::{SerializeSeq, Serializer};

use super::detect::{self, DetectScratch, Detection};
use super::events::{Decision, Observation};
use super::preprocess::SourceMap;
use crate::config::events::{Publish, ValueConfig};
use crate::config::{ClassificationConfig, DetectionConfig, PostProcess};
use crate::model::{DType, Model, OutputTensor, Session};

/// Microseconds since the Unix epoch.
pub fn unix_us(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64)
}

/// Per-frame facts that go into a result.
#[derive(Debug, Clone, Copy)]
pub struct ResultMeta<'a> {
    pub pipeline: &'a str,
    pub topic: &'a str,
    pub frame: u64,
    pub seq: Option<u64>,
    pub ts: Option<f64>,
    pub received_us: u64,
    pub queue_us: u64,
    pub inference_us: u64,
    pub total_us: u64,
    /// Image frames: where the model's input pixels came from (detection boxes are mapped
    /// through it to source pixels).
    pub source: Option<SourceMap>,
}

/// Turns a finished inference into the result JSON. One per worker; its scratch space is reused.
pub struct ResultWriter {
    post: PostProcess,
    labels: Vec<String>,
    /// Index of the output ranked for top-k.
    score_output: usize,
    output_names: Vec<String>,
    scratch: Vec<(usize, f64)>,
    detect: DetectScratch,
    /// The regression value / anomaly score of the prepared row.
    value: f64,
    /// Distinct detected classes of the prepared row.
    classes: Vec<u32>,
    /// The model results are stamped with (the one this writer was built for).
    model_name: String,
    model_version: String,
    model_sha256: String,
}

impl ResultWriter {
    /// `labels` are already loaded (one per class). Fails if the configured score output does
    /// not exist.
    pub fn new(post: PostProcess, labels: Vec<String>, model: &Model) -> Result<Self, String> {
        let output_names: Vec<String> = model.outputs.iter().map(|o| o.name.clone()).collect();
        let score_output = match &post {
            PostProcess::Classification(ClassificationConfig { output: Some(name), .. })
            | PostProcess::Detection(DetectionConfig { output: Some(name), .. })
            | PostProcess::Regression(ValueConfig { output: Some(name), .. })
            | PostProcess::AnomalyScore(ValueConfig { output: Some(name), .. }) => {
                output_names.iter().position(|n| n == name).ok_or_else(|| {
                    format!("postprocess.output names `{name}`, but the model's outputs are {output_names:?}")
                })?
            }
            _ => 0,
        };
        if let PostProcess::Detection(d) = &post {
            let out = model.outputs.get(score_output).ok_or("the model has no outputs")?;
            let classes = (!labels.is_empty()).then_some(labels.len());
            detect::geometry(d.layout, &out.shape, classes)
                .map_err(|e| format!("detection output `{}`: {e}", out.name))?;
        }
        if let PostProcess::Regression(v) | PostProcess::AnomalyScore(v) = &post {
            let out = model.outputs.get(score_output).ok_or("the model has no outputs")?;
            if v.index >= out.len() || !out.dtype.is_float() {
                return Err(format!(
                    "postprocess.index {} is not an element of output `{}` ({} {:?}: {} float elements)",
                    v.index,
                    out.name,
                    out.dtype,
                    out.shape,
                    if out.dtype.is_float() { out.len() } else { 0 }
                ));
            }
        }
        Ok(Self {
            post,
            labels,
            score_output,
            output_names,
            scratch: Vec::new(),
            detect: DetectScratch::default(),
            value: f64::NAN,
            classes: Vec::new(),
            model_name: model.name.clone(),
            model_version: model.version.clone(),
            model_sha256: model.sha256.clone(),
        })
    }

    /// Runs the post-processing of row `row` of the last run of `session` (0 unless the session
    /// ran a batch) into the writer's scratch, and returns what event mode compares. Call
    /// [`ResultWriter::write`] after it for the same row.
    pub fn prepare(
        &mut self,
        meta: &ResultMeta<'_>,
        session: &Session,
        row: usize,
    ) -> serde_json::Result<Observation> {
        let output = || {
            session.output_row(self.score_output, row).ok_or_else(|| {
                serde::ser::Error::custom("the post-processed output is missing from the run")
            })
        };
        Ok(match &self.post {
            PostProcess::Raw => Observation::None,
            PostProcess::Detection(d) => {
                let classes = (!self.labels.is_empty()).then_some(self.labels.len());
                detect::detect(d, classes, &output()?, meta.source.as_ref(), &mut self.detect)
                    .map_err(serde::ser::Error::custom)?;
                // The set of classes present (order and count do not matter), as an FNV-1a
                // digest of the sorted distinct class indices.
                self.classes.clear();
                self.classes.extend(self.detect.detections.iter().map(|d| d.class));
                self.classes.sort_unstable();
                self.classes.dedup();
                let digest = self.classes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, c| {
                    (h ^ u64::from(*c)).wrapping_mul(0x0100_0000_01b3)
                });
                Observation::Key(digest)
            }
            PostProcess::Classification(c) => {
                let out = output()?;
                rank(
                    &mut self.scratch,
                    (0..out.len()).map(|i| out.get_f64(i).unwrap_or(f64::NAN)),
                    c.top_k,
                    c.softmax,
                );
                if let Some(t) = c.score_threshold {
                    self.scratch.retain(|(_, score)| *score >= t);
                }
                // No class over the threshold is a state of its own for event mode.
                Observation::Key(self.scratch.first().map_or(u64::MAX, |(index, _)| *index as u64))
            }
            PostProcess::Regression(v) | PostProcess::AnomalyScore(v) => {
                self.value = output()?.get_f64(v.index).unwrap_or(f64::NAN);
                Observation::Value(self.value)
            }
        })
    }

    /// Serializes the result prepared by [`ResultWriter::prepare`] into `buf` (cleared first),
    /// with the event gate's decision when the pipeline has one.
    pub fn write(
        &mut self,
        buf: &mut Vec<u8>,
        meta: &ResultMeta<'_>,
        session: &Session,
        row: usize,
        event: Option<&Decision>,
    ) -> serde_json::Result<()> {
        buf.clear();
        let mut detections = None;
        let mut value = None;
        let (top_k, include_outputs) = match &self.post {
            PostProcess::Raw => (None, true),
            PostProcess::Detection(d) => {
                detections =
                    Some(Detections { items: &self.detect.detections, labels: &self.labels });
                (None, d.include_outputs)
            }
            PostProcess::Classification(c) => {
                (Some(TopK { items: &self.scratch, labels: &self.labels }), c.include_outputs)
            }
            PostProcess::Regression(v) => {
                value = Some(ValueMsg::Regression {
                    value: Finite(self.value),
                    above_threshold: event.and_then(|e| e.active),
                });
                (None, v.include_outputs)
            }
            PostProcess::AnomalyScore(v) => {
                value = Some(ValueMsg::Anomaly {
                    anomaly_score: Finite(self.value),
                    anomalous: event.and_then(|e| e.active).unwrap_or(false),
                });
                (None, v.include_outputs)
            }
        };
        let event = event.filter(|e| e.mode != Publish::Always).map(|e| EventMsg {
            publish: e.mode.as_str(),
            reason: e.reason,
            suppressed: e.suppressed,
        });
        let msg = ResultMsg {
            pipeline: meta.pipeline,
            model: ModelRef {
                name: &self.model_name,
                version: &self.model_version,
                sha256: &self.model_sha256,
            },
            topic: meta.topic,
            frame: meta.frame,
            seq: meta.seq,
            ts: meta.ts,
            received_us: meta.received_us,
            timing_us: Timing {
                queue: meta.queue_us,
                inference: meta.inference_us,
                total: meta.total_us,
            },
            outputs: include_outputs.then_some(Outputs { session, row, names: &self.output_names }),
            top_k,
            image: meta.source.map(|m| ImageSize { width: m.width, height: m.height }),
            detections,
            value,
            event,
        };
        serde_json::to_writer(buf, &msg)
    }
}

/// Fills `scratch` with the `k` best (index, score) pairs of `scores`, best first; with
/// `softmax`, scores are normalized first.
fn rank(
    scratch: &mut Vec<(usize, f64)>,
    scores: impl Iterator<Item = f64>,
    k: usize,
    softmax: bool,
) {
    scratch.clear();
    scratch.extend(scores.enumerate());
    if softmax && !scratch.is_empty() {
        let max = scratch.iter().map(|(_, v)| *v).fold(f64::NEG_INFINITY, f64::max);
        let sum: f64 = scratch.iter().map(|(_, v)| (v - max).exp()).sum();
        for (_, v) in scratch.iter_mut() {
            *v = (*v - max).exp() / sum;
        }
    }
    let by_score = |a: &(usize, f64), b: &(usize, f64)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    let k = k.min(scratch.len());
    if k > 0 && k < scratch.len() {
        scratch.select_nth_unstable_by(k - 1, by_score);
    }
    scratch.truncate(k);
    scratch.sort_unstable_by(by_score);
}

#[derive(Serialize)]
struct ResultMsg<'a> {
    pipeline: &'a str,
    model: ModelRef<'a>,
    topic: &'a str,
    frame: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    seq: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ts: Option<f64>,
    received_us: u64,
    timing_us: Timing,
    #[serde(skip_serializing_if = "Option::is_none")]
    outputs: Option<Outputs<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_k: Option<TopK<'a>>,
    /// The source frame's size (image frames), the space detection boxes are in.
    #[serde(skip_serializing_if = "Option::is_none")]
    image: Option<ImageSize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    detections: Option<Detections<'a>>,
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    value: Option<ValueMsg>,
    #[serde(skip_serializing_if = "Option::is_none")]
    event: Option<EventMsg>,
}

/// `"value"` (+ `"above_threshold"`) of a regression, `"anomaly_score"` + `"anomalous"` of an
/// anomaly score; flattened into the result.
#[derive(Serialize)]
#[serde(untagged)]
enum ValueMsg {
    Regression {
        value: Finite,
        #[serde(skip_serializing_if = "Option::is_none")]
        above_threshold: Option<bool>,
    },
    Anomaly {
        anomaly_score: Finite,
        anomalous: bool,
    },
}

/// A float that prints as `null` when it is not finite (JSON has no NaN).
struct Finite(f64);

impl Serialize for Finite {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if self.0.is_finite() { s.serialize_f64(self.0) } else { s.serialize_none() }
    }
}

/// Why an event-mode result was published.
#[derive(Serialize)]
struct EventMsg {
    publish: &'static str,
    reason: &'static str,
    /// Results of this device withheld since its previous published one.
    suppressed: u64,
}

#[derive(Serialize)]
struct ImageSize {
    width: usize,
    height: usize,
}

struct Detections<'a> {
    items: &'a [Detection],
    labels: &'a [String],
}

impl Serialize for Detections<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Item<'a> {
            class: u32,
            label: Option<&'a str>,
            score: f32,
            #[serde(rename = "box")]
            bbox: [f32; 4],
        }
        let mut seq = s.serialize_seq(Some(self.items.len()))?;
        for d in self.items {
            seq.serialize_element(&Item {
                class: d.class,
                label: self.labels.get(d.class as usize).map(String::as_str),
                score: d.score,
                bbox: d.bbox,
            })?;
        }
        seq.end()
    }
}

#[derive(Serialize)]
struct ModelRef<'a> {
    name: &'a str,
    version: &'a str,
    sha256: &'a str,
}

#[derive(Serialize)]
struct Timing {
    queue: u64,
    inference: u64,
    total: u64,
}

struct Outputs<'a> {
    session: &'a Session,
    row: usize,
    names: &'a [String],
}

impl Serialize for Outputs<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(self.names.len()))?;
        for (i, out) in self.session.outputs_row(self.row).enumerate() {
            seq.serialize_element(&OutputMsg {
                name: self.names.get(i).map_or("", String::as_str),
                dtype: out.dtype().map_or("unknown", DType::name),
                shape: out.shape(),
                data: Data(&out),
            })?;
        }
        seq.end()
    }
}

#[derive(Serialize)]
struct OutputMsg<'a> {
    name: &'a str,
    dtype: &'static str,
    shape: &'a [usize],
    data: Data<'a, 'a>,
}

/// Tensor elements in their own type, so f32 values print in their shortest exact form.
struct Data<'a, 'b>(&'a OutputTensor<'b>);

impl Serialize for Data<'_, '_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let t = self.0;
        let bytes = t.bytes();
        let mut seq = s.serialize_seq(Some(t.len()))?;
        match t.dtype() {
            Some(DType::F32) => {
                for c in bytes.chunks_exact(4) {
                    seq.serialize_element(&f32::from_le_bytes([c[0], c[1], c[2], c[3]]))?;
                }
            }
            Some(DType::F16) => {
                for i in 0..t.len() {
                    seq.serialize_element(&(t.get_f64(i).unwrap_or(f64::NAN) as f32))?;
                }
            }
            Some(dt) if dt.is_float() => {
                for i in 0..t.len() {
                    seq.serialize_element(&t.get_f64(i))?;
                }
            }
            Some(DType::I64) => {
                for c in bytes.chunks_exact(8) {
                    let mut a = [0u8; 8];
                    a.copy_from_slice(c);
                    seq.serialize_element(&i64::from_le_bytes(a))?;
                }
            }
            Some(DType::U64) => {
                for c in bytes.chunks_exact(8) {
                    let mut a = [0u8; 8];
                    a.copy_from_slice(c);
                    seq.serialize_element(&u64::from_le_bytes(a))?;
                }
            }
            Some(DType::Bool) => {
                for b in bytes {
                    seq.serialize_element(&(*b != 0))?;
                }
            }
            // Remaining integer types fit exactly in an f64 -> i64.
            Some(_) => {
                for i in 0..t.len() {
                    seq.serialize_element(&(t.get_f64(i).unwrap_or(0.0) as i64))?;
                }
            }
            None => {}
        }
        seq.end()
    }
}

struct TopK<'a> {
    items: &'a [(usize, f64)],
    labels: &'a [String],
}

impl Serialize for TopK<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Item<'a> {
            index: usize,
            label: Option<&'a str>,
            score: f64,
        }
        let mut seq = s.serialize_seq(Some(self.items.len()))?;
        for (index, score) in self.items {
            seq.serialize_element(&Item {
                index: *index,
                label: self.labels.get(*index).map(String::as_str),
                score: *score,
            })?;
        }
        seq.end()
    }
}

/// An error message for the error topic.
#[derive(Serialize)]
pub struct ErrorMsg<'a> {
    pub pipeline: &'a str,
    pub topic: &'a str,
    pub reason: &'a str,
    pub detail: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
    pub at_us: u64,
}

/// Reads a labels file: one label per line, trailing whitespace trimmed, blank lines kept (so
/// line N is always class N).
pub fn read_labels(text: &str) -> Vec<String> {
    text.lines().map(|l| l.trim_end().to_string()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranking_picks_the_best_k_in_order() {
        let mut s = Vec::new();
        rank(&mut s, [0.1, 0.7, 0.05, 0.15, 0.7].into_iter(), 3, false);
        assert_eq!(s, vec![(1, 0.7), (4, 0.7), (3, 0.15)], "ties broken by index");
        rank(&mut s, [1.0, 2.0].into_iter(), 5, false);
        assert_eq!(s, vec![(1, 2.0), (0, 1.0)], "k larger than the class count");
        rank(&mut s, [0.0, 2f64.ln()].into_iter(), 2, true);
        assert!((s[0].1 - 2.0 / 3.0).abs() < 1e-12 && (s[1].1 - 1.0 / 3.0).abs() < 1e-12, "{s:?}");
        rank(&mut s, std::iter::empty(), 3, true);
        assert!(s.is_empty());
    }

    #[test]
    fn labels_keep_line_numbers() {
        assert_eq!(read_labels("cat\n\ndog  \n"), vec!["cat", "", "dog"]);
    }
}
