//! Configuration: the TOML file, its validation, and the validated types the rest of the daemon
//! is built from.
//!
//! Reading goes TOML text -> `toml::Table` -> [`Config`] through a typed reader that collects
//! every problem (unknown keys, wrong types, bad values, cross-key conflicts) with its dotted key
//! path and value, so `edgeinfer validate` reports all of them at once. This module does not load
//! models or talk to the broker: files are only checked for readability ([`Config::check_files`]).
//! The annotated default configuration is `config/edgeinfer.toml` in the repository, embedded here
//! as [`DEFAULT_CONFIG`] so that `edgeinfer config default` always matches the code.

pub mod engine;
pub mod events;
pub mod image;
mod reader;
pub mod units;
pub mod window;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;
use std::{fmt, fs, io};

pub use reader::Problem;
use reader::{Problems, Section};
use toml::{Table, Value};

use crate::topic::{self, TopicFilter, TopicTemplate};

/// The annotated default configuration (`config/edgeinfer.toml`).
pub const DEFAULT_CONFIG: &str = include_str!("../../../config/edgeinfer.toml");

/// Default location of the configuration file on a device.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/edgeinfer/edgeinfer.toml";

/// Largest frame payload we allow anywhere (also the MQTT packet ceiling).
pub const MAX_PAYLOAD_LIMIT: u64 = 256 << 20;

/// Errors from reading or validating a config file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("config file {path} is not valid TOML: {message}")]
    Syntax { path: String, message: String },
    #[error("config file {path} is invalid ({} problem(s)):\n{}", problems.len(), ProblemList(problems))]
    Invalid { path: String, problems: Vec<Problem> },
}

struct ProblemList<'a>(&'a [Problem]);

impl fmt::Display for ProblemList<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "  - {p}")?;
        }
        Ok(())
    }
}

impl ConfigError {
    /// The individual problems, when the file parsed but did not validate.
    pub fn problems(&self) -> &[Problem] {
        match self {
            ConfigError::Invalid { problems, .. } => problems,
            _ => &[],
        }
    }
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where it was read from (relative paths inside were resolved against its directory).
    pub source: Option<PathBuf>,
    /// This appliance's id: one topic level, used in `{device}`.
    pub device_id: String,
    pub broker: BrokerConfig,
    pub health: HealthConfig,
    pub metrics: MetricsConfig,
    pub commands: CommandsConfig,
    pub ota: OtaConfig,
    /// Results kept on disk while the broker is unreachable (`spool`).
    pub spool: SpoolConfig,
    pub errors: ErrorsConfig,
    pub shutdown: ShutdownConfig,
    pub system: SystemConfig,
    /// Pipelines in name order.
    pub pipelines: Vec<PipelineConfig>,
}

/// How the daemon sits in the operating system: user, capabilities, CPUs, cgroup.
#[derive(Debug, Clone)]
pub struct SystemConfig {
    /// Run even when started as root (otherwise refused: use the unit's `User=`).
    pub allow_root: bool,
    /// Capability names kept after start-up (default none).
    pub keep_capabilities: Vec<String>,
    /// CPUs for MQTT/I-O threads; `None`: derived from the allowed set.
    pub io_cpus: Option<Vec<usize>>,
    /// CPUs for inference workers; `None`: derived from the allowed set.
    pub inference_cpus: Option<Vec<usize>>,
    pub worker_sched: WorkerSchedConfig,
    pub cgroup: CgroupConfig,
    /// Persistent state (spool, OTA staging, model cache); `None`: systemd's `$STATE_DIRECTORY` when set.
    pub state_dir: Option<PathBuf>,
    /// Cache decluttered models in `<state_dir>/cache` for fast start.
    pub model_cache: bool,
}

impl SystemConfig {
    /// Where the model cache lives, if it is on: `state_dir`, else `$STATE_DIRECTORY` (the
    /// unit's StateDirectory=, /var/lib/edgeinfer), plus `cache/`.
    pub fn cache_dir(&self) -> Option<PathBuf> {
        if !self.model_cache {
            return None;
        }
        Some(self.state_dir()?.join("cache"))
    }

    /// The state directory: `state_dir`, else `$STATE_DIRECTORY` (the unit's StateDirectory=).
    pub fn state_dir(&self) -> Option<PathBuf> {
        self.state_dir.clone().or_else(|| {
            // systemd may list several directories separated by ':'; ours is the first.
            let v = std::env::var_os("STATE_DIRECTORY")?;
            v.to_string_lossy().split(':').next().filter(|s| !s.is_empty()).map(PathBuf::from)
        })
    }
}

/// Scheduling class of inference worker threads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerSchedConfig {
    Other { nice: i32 },
    Fifo { priority: u8 },
    RoundRobin { priority: u8 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupMode {
    /// Manage the subtree when systemd delegated it; otherwise only read usage.
    Auto,
    /// Never touch cgroups (usage is still read when available).
    Off,
}

#[derive(Debug, Clone)]
pub struct CgroupConfig {
    pub mode: CgroupMode,
    /// The cgroup2 mount.
    pub root: PathBuf,
    pub memory_high: Option<u64>,
    pub memory_max: Option<u64>,
    /// Share of one CPU in percent for the I/O threads (`cpu.max`).
    pub io_cpu_max: Option<u32>,
    /// Share of one CPU in percent for the inference workers (`cpu.max`).
    pub inference_cpu_max: Option<u32>,
    /// Fraction of the memory limit that queued frames may occupy.
    pub queue_memory_fraction: f64,
}

/// MQTT broker connection.
#[derive(Debug, Clone)]
pub struct BrokerConfig {
    pub host: String,
    pub port: u16,
    /// Rendered client id (`{device}` substituted).
    pub client_id: String,
    pub keepalive: Duration,
    /// `false` (default) keeps a persistent session so QoS 1 frames queued by the broker while
    /// the daemon was away are delivered when it returns.
    pub clean_session: bool,
    pub username: Option<String>,
    pub password: Option<Secret>,
    pub tls: Option<TlsConfig>,
    /// Largest MQTT packet accepted from the broker (frames above it are refused by the client).
    pub max_packet_size: u64,
    pub connect_timeout: Duration,
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
    /// Maximum unacknowledged outgoing QoS 1 publishes.
    pub inflight: u16,
    /// Longest topic of an incoming message, in bytes; longer ones are rejected and counted
    /// before routing (MQTT allows 65,535, which no device needs and which every per-device
    /// table would otherwise have to hold).
    pub max_topic_length: usize,
    /// Consecutive connection resets caused by one packet above `max_packet_size` (a QoS 1
    /// frame the broker redelivers at every reconnect of a persistent session) before the
    /// daemon clears its session once to get rid of it; 0: never.
    pub oversized_session_reset: u32,
}

/// Where the broker password comes from. Never printed.
#[derive(Clone)]
pub enum Secret {
    Inline(String),
    File(PathBuf),
    /// A systemd credential: `$CREDENTIALS_DIRECTORY/<name>` (the unit's LoadCredential=).
    Credential(String),
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Secret::Inline(_) => f.write_str("Secret::Inline(<redacted>)"),
            Secret::File(p) => write!(f, "Secret::File({})", p.display()),
            Secret::Credential(n) => write!(f, "Secret::Credential({n})"),
        }
    }
}

impl Secret {
    /// Where the secret is read from (`None`: inline, or a credential without
    /// `$CREDENTIALS_DIRECTORY`).
    pub fn path(&self) -> Option<PathBuf> {
        match self {
            Secret::Inline(_) => None,
            Secret::File(p) => Some(p.clone()),
            Secret::Credential(n) => {
                std::env::var_os("CREDENTIALS_DIRECTORY").map(|d| PathBuf::from(d).join(n))
            }
        }
    }

    /// The secret value (a password file's first line, without trailing newline).
    pub fn read(&self) -> io::Result<String> {
        match self {
            Secret::Inline(s) => Ok(s.clone()),
            Secret::File(p) => {
                let s = fs::read_to_string(p)?;
                Ok(s.lines().next().unwrap_or_default().to_string())
            }
            Secret::Credential(_) => {
                let p = self.path().ok_or_else(|| {
                    io::Error::new(
                        io::ErrorKind::NotFound,
                        "$CREDENTIALS_DIRECTORY is not set; hint: give the unit \
                         LoadCredential=<name>:<file> (or use password_file outside systemd)",
                    )
                })?;
                let s = fs::read_to_string(p)?;
                Ok(s.lines().next().unwrap_or_default().to_string())
            }
        }
    }
}

/// TLS to the broker. Without `ca_file` the system's trust store is used.
#[derive(Debug, Clone)]
pub struct TlsConfig {
    pub ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
}

#[derive(Debug, Clone)]
pub struct HealthConfig {
    pub topic: TopicTemplate,
    pub interval: Duration,
}

/// Model delivery over MQTT (see `ota`).
#[derive(Debug, Clone)]
pub struct OtaConfig {
    pub enabled: bool,
    /// Base topic: `<topic>/<pipeline>/{manifest,chunk/<n>,status}`.
    pub topic: TopicTemplate,
    /// key_id -> base64 ed25519 public key.
    pub trusted_keys: BTreeMap<String, String>,
    pub max_size: u64,
    /// Free space to keep on the state directory's file system.
    pub min_free: u64,
    /// Fleet groups this device belongs to: a manifest's `target` must be the device id or one
    /// of these.
    pub groups: Vec<String>,
}

/// `[spool]` settings.
#[derive(Debug, Clone)]
pub struct SpoolConfig {
    pub enabled: bool,
    /// Disk space the spool may use; the oldest results are evicted beyond it.
    pub max_size: u64,
    /// Longest time a spooled result stays in memory before it is written to disk.
    pub commit_interval: Duration,
}

impl Default for SpoolConfig {
    fn default() -> Self {
        Self { enabled: true, max_size: 64 << 20, commit_interval: Duration::from_millis(200) }
    }
}

#[derive(Debug, Clone)]
pub struct CommandsConfig {
    /// Topic on which `{"pipeline": "name"}` (or an empty payload: every pipeline) asks for a
    /// model reload; `None`: no MQTT commands.
    pub reload_topic: Option<TopicTemplate>,
    /// Where swap outcomes and other lifecycle events are published.
    pub events_topic: TopicTemplate,
}

#[derive(Debug, Clone)]
pub struct MetricsConfig {
    pub topic: TopicTemplate,
    /// Address of the Prometheus text endpoint (`GET /metrics`); `None`: no HTTP endpoint.
    pub listen: Option<std::net::SocketAddr>,
    /// A device timestamp further than this from the daemon's clock (either way) is not trusted
    /// for end-to-end latency or frame age; such frames are counted as `clock_skew`.
    pub max_clock_skew: Duration,
    /// `None` disables the periodic metrics message.
    pub interval: Option<Duration>,
}

#[derive(Debug, Clone)]
pub struct ErrorsConfig {
    pub topic: TopicTemplate,
    /// Error messages per second per pipeline; excess is counted, not published.
    pub rate_limit: u32,
}

#[derive(Debug, Clone)]
pub struct ShutdownConfig {
    /// How long SIGTERM waits for queued frames to be served before giving up on them.
    pub grace: Duration,
}

/// How a pipeline's payloads are encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PayloadFormat {
    /// Little-endian tensor bytes of exactly the model input's dtype and shape.
    Raw,
    /// `{"seq":…, "ts":…, "data":[…]}` or `{"inputs": {"name": […]}}`.
    Json,
    /// A baseline or progressive JPEG (8-bit grayscale or color), pre-processed per [`image`].
    Jpeg,
    /// A PNG (any bit depth, normalized to 8-bit gray or RGB), pre-processed per [`image`].
    Png,
    /// The json structure in CBOR (RFC 8949); a tensor may also be a byte string or an RFC 8746
    /// typed array of the input's dtype (zero-copy).
    Cbor,
    /// Signed 16-bit little-endian PCM audio chunks, channels interleaved, assembled into
    /// windows per [`window`].
    PcmS16le,
}

impl PayloadFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            PayloadFormat::Raw => "raw",
            PayloadFormat::Json => "json",
            PayloadFormat::Jpeg => "jpeg",
            PayloadFormat::Png => "png",
            PayloadFormat::Cbor => "cbor",
            PayloadFormat::PcmS16le => "pcm_s16le",
        }
    }
}

/// What to do with non-finite floats (NaN, ±inf) in a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NanPolicy {
    Reject,
    Allow,
}

/// What a full queue does with a new frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropPolicy {
    /// Evict the oldest queued frame (freshest data wins; the default for sensors).
    DropOldest,
    /// Refuse the new frame.
    DropNewest,
    /// Stop reading from the broker until there is room (back-pressure), up to `block_timeout`.
    Block,
}

impl DropPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            DropPolicy::DropOldest => "drop_oldest",
            DropPolicy::DropNewest => "drop_newest",
            DropPolicy::Block => "block",
        }
    }
}

#[derive(Debug, Clone)]
pub struct QueueConfig {
    pub capacity: usize,
    pub policy: DropPolicy,
    pub block_timeout: Duration,
}

/// What is published for each frame.
#[derive(Debug, Clone)]
pub enum PostProcess {
    /// Every output tensor as name, shape and data.
    Raw,
    Classification(ClassificationConfig),
    Detection(DetectionConfig),
    /// One output value (optionally with a threshold state).
    Regression(events::ValueConfig),
    /// One output value as an anomaly score with a threshold: `anomalous` true/false.
    AnomalyScore(events::ValueConfig),
}

impl PostProcess {
    /// The labels file, when the post-processing names classes.
    pub fn labels(&self) -> Option<&Path> {
        match self {
            PostProcess::Raw | PostProcess::Regression(_) | PostProcess::AnomalyScore(_) => None,
            PostProcess::Classification(c) => c.labels.as_deref(),
            PostProcess::Detection(d) => d.labels.as_deref(),
        }
    }
}

/// The output layout of a YOLO-style detector (both as their ONNX exports write them, decode
/// included: boxes are `cx, cy, w, h` in input pixels).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum YoloLayout {
    /// `[1, 4 + classes, anchors]` (or transposed): box, then per-class scores (sigmoid applied).
    V8,
    /// `[1, anchors, 5 + classes]` (or transposed): box, objectness, then per-class scores;
    /// a box's score is objectness x class score.
    V5,
}

/// `kind = "detection"`: decode, score threshold, non-maximum suppression, boxes in source
/// pixels.
#[derive(Debug, Clone)]
pub struct DetectionConfig {
    pub layout: YoloLayout,
    /// One label per line; line N names class N (and fixes the class count).
    pub labels: Option<PathBuf>,
    /// Which output holds the predictions (default: the first).
    pub output: Option<String>,
    /// A box is a candidate when its best class score is above this (v5: objectness too).
    pub score_threshold: f32,
    /// A candidate is suppressed by a better one of the same class overlapping more than this.
    pub iou_threshold: f32,
    /// Detections published per frame, best first.
    pub max_detections: usize,
    /// Candidates entering NMS, best first (bounds its cost on a noisy frame).
    pub max_candidates: usize,
    /// Suppress across classes (one box per object whatever its class).
    pub class_agnostic: bool,
    /// Also publish the raw output tensors.
    pub include_outputs: bool,
}

#[derive(Debug, Clone)]
pub struct ClassificationConfig {
    pub top_k: usize,
    /// One label per line; line N names class N.
    pub labels: Option<PathBuf>,
    /// Which output holds the scores (default: the first).
    pub output: Option<String>,
    /// Apply softmax to the scores before ranking (for models that emit logits).
    pub softmax: bool,
    /// Only classes scoring at least this (after softmax) are listed in `top_k`.
    pub score_threshold: Option<f64>,
    /// Also publish the raw output tensors.
    pub include_outputs: bool,
}

/// MQTT quality of service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Qos {
    AtMostOnce,
    AtLeastOnce,
    ExactlyOnce,
}

/// Largest `max_batch` accepted.
pub const MAX_BATCH: usize = 64;

/// One model served on one input stream.
#[derive(Debug, Clone)]
pub struct PipelineConfig {
    pub name: String,
    pub model: PathBuf,
    /// Version to report; default: the ONNX `model_version`, else the first 12 hex digits of
    /// the file's SHA-256.
    pub model_version: Option<String>,
    pub input: TopicFilter,
    pub output: TopicTemplate,
    pub format: PayloadFormat,
    /// Image frames (jpeg, png, or raw with a declared geometry) and their pre-processing;
    /// `None` for tensor frames.
    pub image: Option<image::ImageConfig>,
    /// Whether binary frames start with the edgeinfer envelope (seq, ts, deadline).
    pub envelope: window::Envelope,
    /// Sample streams (pcm_s16le, or raw with a `[window]` table) assembled into windows per
    /// device; `None` for frames that are a whole input each.
    pub window: Option<window::WindowConfig>,
    pub qos: Qos,
    pub max_payload: u64,
    pub nan: NanPolicy,
    /// Concrete shapes for model inputs whose stored shape has symbolic or unknown dimensions.
    pub input_shapes: BTreeMap<String, Vec<usize>>,
    pub workers: usize,
    /// Frames a worker may run in one inference (models with a symbolic batch axis); 1: off.
    pub max_batch: usize,
    /// CPUs the workers are pinned to (worker i -> cpus[i % len]); empty: not pinned.
    pub cpus: Vec<usize>,
    pub queue: QueueConfig,
    pub postprocess: PostProcess,
    /// Which results are published, per device (event mode).
    pub events: events::EventsConfig,
    /// Frames older than this when a worker picks them up are dropped as `expired` (age from
    /// the device timestamp when trusted, else from arrival).
    pub max_age: Option<Duration>,
    /// Time from arrival by which a result is still useful; a frame that cannot make it is
    /// dropped as `deadline_missed`. A frame's own `deadline_ms` overrides it.
    pub deadline: Option<Duration>,
    pub slo: SloConfig,
    pub overload: OverloadConfig,
    /// Drop QoS 1 redeliveries (same device, seq and payload) as `duplicate`.
    pub dedup: bool,
    /// Reload the model when its file changes (inotify on its directory).
    pub watch_model: bool,
    /// Relative tolerance of a swap candidate's outputs against its golden pairs.
    pub golden_tolerance: f64,
    /// Refuse a swap candidate that ships no golden pairs.
    pub require_golden: bool,
    /// After a swap, how long the new model is compared with the previous one (zero: no
    /// probation), and the limits of that comparison.
    pub probation: Duration,
    pub probation_min_frames: u64,
    pub probation_latency_ratio: f64,
    /// ...and more than this above it.
    pub probation_latency_floor: Duration,
    pub probation_error_rate: f64,
    /// How the model runs: intra-op threads, precision, backend (issue 15; `config::engine`).
    pub engine: engine::EngineConfig,
}

/// Service-level objectives of one pipeline (see `telemetry::slo`).
#[derive(Debug, Clone, Default)]
pub struct SloConfig {
    pub latency: Option<LatencySlo>,
    pub served: Option<ServedSlo>,
    /// Fewer events than this in a window give no verdict (state stays `ok`).
    pub min_frames: u64,
}

/// `quantile` of arrival -> result latency within `objective` over `window`.
#[derive(Debug, Clone, PartialEq)]
pub struct LatencySlo {
    pub objective: Duration,
    pub quantile: f64,
    pub window: Duration,
}

/// At least `ratio` of valid frames served over `window`.
#[derive(Debug, Clone, PartialEq)]
pub struct ServedSlo {
    pub ratio: f64,
    pub window: Duration,
}

/// Adaptive overload control of one pipeline (see `pipeline::overload`).
#[derive(Debug, Clone)]
pub struct OverloadConfig {
    pub adaptive: bool,
    pub interval: Duration,
}

impl Default for OverloadConfig {
    fn default() -> Self {
        OverloadConfig { adaptive: true, interval: Duration::from_millis(250) }
    }
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
        let mut cfg = Self::parse_str(&text, &path.display().to_string(), path.parent())?;
        cfg.source = Some(path.to_path_buf());
        Ok(cfg)
    }

    /// Parses and validates config text. Relative paths are resolved against `base_dir`.
    pub fn parse_str(
        text: &str,
        origin: &str,
        base_dir: Option<&Path>,
    ) -> Result<Config, ConfigError> {
        let table: Table = toml::from_str(text).map_err(|e| ConfigError::Syntax {
            path: origin.to_string(),
            message: e.to_string().trim_end().to_string(),
        })?;
        let mut p = Problems::default();
        let cfg = build(&table, base_dir.unwrap_or(Path::new(".")), &mut p);
        match cfg {
            Some(cfg) if p.0.is_empty() => Ok(cfg),
            _ => Err(ConfigError::Invalid { path: origin.to_string(), problems: p.0 }),
        }
    }

    /// Checks that every file the config names exists and is readable, so a typo fails
    /// `validate` (the unit's `ExecStartPre=`) instead of the start-up.
    pub fn check_files(&self) -> Vec<Problem> {
        let mut out = Vec::new();
        let mut no_credentials: Option<String> = None;
        let mut check = |key: String, path: &Path| {
            if let Err(e) = fs::File::open(path).and_then(|f| {
                if f.metadata()?.is_dir() {
                    Err(io::Error::other("is a directory"))
                } else {
                    Ok(())
                }
            }) {
                out.push(Problem {
                    key,
                    value: Some(format!("{:?}", path.display().to_string())),
                    message: format!("cannot read file: {e}"),
                });
            }
        };
        for pl in &self.pipelines {
            check(format!("pipelines.{}.model", pl.name), &pl.model);
            if let Some(l) = pl.postprocess.labels() {
                check(format!("pipelines.{}.postprocess.labels", pl.name), l);
            }
        }
        match &self.broker.password {
            Some(Secret::File(f)) => check("broker.password_file".into(), f),
            Some(c @ Secret::Credential(n)) => match c.path() {
                Some(f) => check("broker.password_credential".into(), &f),
                None => no_credentials = Some(n.clone()),
            },
            _ => {}
        }
        if let Some(tls) = &self.broker.tls {
            for (k, f) in [
                ("ca_file", &tls.ca_file),
                ("cert_file", &tls.cert_file),
                ("key_file", &tls.key_file),
            ] {
                if let Some(f) = f {
                    check(format!("broker.tls.{k}"), f);
                }
            }
        }
        if let Some(n) = no_credentials {
            out.push(Problem {
                key: "broker.password_credential".into(),
                value: Some(format!("{n:?}")),
                message: "$CREDENTIALS_DIRECTORY is not set; hint: the unit's \
                          LoadCredential=<name>:<file> provides it"
                    .into(),
            });
        }
        out
    }

    /// The largest payload any pipeline accepts (sizes the MQTT client's packet limit).
    pub fn max_payload(&self) -> u64 {
        self.pipelines.iter().map(|p| p.max_payload).max().unwrap_or(0)
    }
}

/// The machine's host name turned into a valid device id (a single topic level).
fn default_device_id() -> String {
    let host =
        nix::unistd::gethostname().ok().and_then(|h| h.into_string().ok()).unwrap_or_default();
    let cleaned: String = host
        .chars()
        .map(
            |c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' { c } else { '_' },
        )
        .take(64)
        .collect();
    if cleaned.is_empty() { "edgeinfer".to_string() } else { cleaned }
}

fn resolve(base: &Path, p: &str) -> PathBuf {
    let p = Path::new(p);
    if p.is_absolute() { p.to_path_buf() } else { base.join(p) }
}

/// QoS 0 or 1. QoS 2 is refused: the MQTT client (rumqttc 0.25) hands out a packet id again
/// while an earlier QoS 2 publish with that id still awaits PUBCOMP, and the broker discards the
/// new message as a repeat (measured: 1068 of 2000 results lost in a burst, no fault injected).
fn qos(s: &mut Section<'_>, p: &mut Problems, key: &'static str, default: Qos) -> Qos {
    let raw = s.get(key).cloned();
    match raw.as_ref().and_then(Value::as_integer) {
        Some(2) => {
            p.push(
                s.key(key),
                raw.as_ref(),
                "QoS 2 is not supported (the MQTT client can reuse a packet id still in a QoS 2 \
                 handshake and the broker then drops the message); use 1: a result repeated after \
                 a reconnect is byte-identical, so consumers drop repeats by (topic, seq)",
            );
            default
        }
        Some(0) => Qos::AtMostOnce,
        Some(1) => Qos::AtLeastOnce,
        _ => {
            if raw.is_some() {
                p.push(s.key(key), raw.as_ref(), "expected 0 or 1");
            }
            default
        }
    }
}

/// Builds the validated config; returns `None` only when the structure is too broken to go on
/// (every problem is still recorded in `p`).
fn build(table: &Table, base: &Path, p: &mut Problems) -> Option<Config> {
    let mut root = Section::new("", table);

    let device_id = match root.string(p, "device_id") {
        Some(d) => {
            if let Err(e) = topic::validate_level(d) {
                p.push("device_id", root.get("device_id"), e);
            }
            d.to_string()
        }
        None => default_device_id(),
    };

    let broker = broker(&mut root, p, &device_id, base);

    let health = {
        let mut s = root.table(p, "health");
        let topic = template(s.as_mut(), p, "topic", "edgeinfer/{device}/health", 0);
        let interval = s
            .as_mut()
            .and_then(|s| {
                s.duration(p, "interval", Duration::from_secs(1), Duration::from_secs(3600))
            })
            .unwrap_or(Duration::from_secs(10));
        if let Some(s) = s {
            s.finish(p);
        }
        HealthConfig { topic, interval }
    };

    let metrics = {
        let mut s = root.table(p, "metrics");
        let topic = template(s.as_mut(), p, "topic", "edgeinfer/{device}/metrics", 0);
        let interval = s
            .as_mut()
            .and_then(|s| s.duration(p, "interval", Duration::ZERO, Duration::from_secs(3600)))
            .unwrap_or(Duration::from_secs(10));
        let listen = s.as_mut().and_then(|s| {
            let text = s.string(p, "listen")?;
            match text.parse::<std::net::SocketAddr>() {
                Ok(a) => Some(a),
                Err(_) => {
                    p.push(
                        s.key("listen"),
                        Some(&Value::String(text.into())),
                        "expected an IP address and port, e.g. \"127.0.0.1:9464\" (\"[::1]:9464\" for IPv6)",
                    );
                    None
                }
            }
        });
        let max_clock_skew = s
            .as_mut()
            .and_then(|s| {
                s.duration(
                    p,
                    "max_clock_skew",
                    Duration::from_millis(1),
                    Duration::from_secs(86400),
                )
            })
            .unwrap_or(Duration::from_secs(2));
        if let Some(s) = s {
            s.finish(p);
        }
        MetricsConfig {
            topic,
            listen,
            max_clock_skew,
            interval: (!interval.is_zero()).then_some(interval),
        }
    };

    let commands = {
        let mut s = root.table(p, "commands");
        let disabled = s.as_mut().is_some_and(
            |s| matches!(s.get("reload_topic"), Some(Value::String(t)) if t.is_empty()),
        );
        let reload = template(s.as_mut(), p, "reload_topic", "edgeinfer/{device}/cmd/reload", 0);
        let events_topic = template(s.as_mut(), p, "events_topic", "edgeinfer/{device}/events", 0);
        if let Some(s) = s {
            s.finish(p);
        }
        CommandsConfig { reload_topic: (!disabled).then_some(reload), events_topic }
    };

    let ota = {
        let mut s = root.table(p, "ota");
        let enabled = s.as_mut().and_then(|s| s.bool(p, "enabled")).unwrap_or(false);
        let topic = template(s.as_mut(), p, "topic", "edgeinfer/{device}/ota", 0);
        let max_size =
            s.as_mut().and_then(|s| s.size(p, "max_size", 1024, 1 << 34)).unwrap_or(512 << 20);
        let min_free =
            s.as_mut().and_then(|s| s.size(p, "min_free", 0, 1 << 40)).unwrap_or(64 << 20);
        let mut trusted_keys = BTreeMap::new();
        if let Some(s) = s.as_mut()
            && let Some(mut keys) = s.table(p, "trusted_keys")
        {
            let entries: Vec<(String, Value)> =
                keys.entries().map(|(k, v)| (k.clone(), v.clone())).collect();
            for (id, v) in entries {
                let key = keys.key(&id);
                use base64::Engine;
                let decoded = v
                    .as_str()
                    .and_then(|t| base64::engine::general_purpose::STANDARD.decode(t.trim()).ok());
                match decoded {
                    Some(b) if b.len() == 32 => {
                        trusted_keys.insert(id, v.as_str().unwrap_or_default().trim().to_string());
                    }
                    _ => p.push(
                        key,
                        Some(&v),
                        "expected a base64 ed25519 public key (32 bytes), as printed by `edgeinfer-ota keygen`",
                    ),
                }
            }
            keys.finish(p);
        }
        if enabled && trusted_keys.is_empty() {
            p.push("ota.trusted_keys", None, "OTA is enabled but trusts no key: add at least one (tools/ota: edgeinfer-ota keygen)");
        }
        let groups = s.as_mut().and_then(|s| s.string_array(p, "groups")).unwrap_or_default();
        for g in &groups {
            if let Err(e) = crate::topic::validate_level(g) {
                p.push("ota.groups", Some(&Value::String(g.clone())), format!("group {g:?} {e}"));
            }
        }
        if let Some(s) = s {
            s.finish(p);
        }
        OtaConfig { enabled, topic, trusted_keys, max_size, min_free, groups }
    };

    let spool = {
        let mut s = root.table(p, "spool");
        let d = SpoolConfig::default();
        let enabled = s.as_mut().and_then(|s| s.bool(p, "enabled")).unwrap_or(d.enabled);
        let max_size =
            s.as_mut().and_then(|s| s.size(p, "max_size", 64 << 10, 1 << 40)).unwrap_or(d.max_size);
        let commit_interval = s
            .as_mut()
            .and_then(|s| {
                s.duration(p, "commit_interval", Duration::from_millis(10), Duration::from_secs(60))
            })
            .unwrap_or(d.commit_interval);
        if let Some(s) = s {
            s.finish(p);
        }
        SpoolConfig { enabled, max_size, commit_interval }
    };

    let errors = {
        let mut s = root.table(p, "errors");
        let topic = template(s.as_mut(), p, "topic", "edgeinfer/{device}/errors/{pipeline}", 0);
        let rate_limit = s
            .as_mut()
            .and_then(|s| s.int(p, "rate_limit", 1, 100_000))
            .map(|n| n as u32)
            .unwrap_or(20);
        if let Some(s) = s {
            s.finish(p);
        }
        ErrorsConfig { topic, rate_limit }
    };

    let shutdown = {
        let mut s = root.table(p, "shutdown");
        let grace = s
            .as_mut()
            .and_then(|s| s.duration(p, "grace", Duration::ZERO, Duration::from_secs(600)))
            .unwrap_or(Duration::from_secs(10));
        if let Some(s) = s {
            s.finish(p);
        }
        ShutdownConfig { grace }
    };

    let system = system(&mut root, p, base);
    // CPUs shared by pipelines without their own `cpus` (checked against workers x threads):
    // system.inference_cpus, else what `sys::cpus::default_split` leaves after the I/O CPU.
    let inference_cpus = system
        .inference_cpus
        .as_ref()
        .map_or_else(|| allowed_cpus().map_or(1, |a| a.len().saturating_sub(1).max(1)), Vec::len);

    let mut pipelines = Vec::new();
    match root.get("pipelines") {
        None => {
            p.push("pipelines", None, "at least one pipeline is required, e.g. [pipelines.digits]")
        }
        Some(Value::Table(t)) => {
            if t.is_empty() {
                p.push(
                    "pipelines",
                    None,
                    "at least one pipeline is required, e.g. [pipelines.digits]",
                );
            }
            for (name, v) in t {
                let key = format!("pipelines.{name}");
                if let Err(e) = topic::validate_level(name) {
                    p.push(key.clone(), None, format!("pipeline name {e}"));
                }
                match v.as_table() {
                    Some(pt) => {
                        if let Some(pl) =
                            pipeline(name, Section::new(key, pt), p, &broker, base, inference_cpus)
                        {
                            pipelines.push(pl);
                        }
                    }
                    None => p.push(key, Some(v), "expected a table ([pipelines.NAME])"),
                }
            }
        }
        Some(other) => {
            p.push("pipelines", Some(other), "expected a table of pipelines ([pipelines.NAME])")
        }
    }
    root.finish(p);

    Some(Config {
        source: None,
        device_id,
        broker,
        health,
        metrics,
        commands,
        ota,
        spool,
        errors,
        shutdown,
        system,
        pipelines,
    })
}

/// This process's allowed CPUs, for validating CPU lists.
fn allowed_cpus() -> Option<Vec<usize>> {
    let set = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0)).ok()?;
    Some((0..nix::sched::CpuSet::count()).filter(|c| set.is_set(*c).unwrap_or(false)).collect())
}

/// A CPU list: no duplicates, every CPU in the allowed set (the message names the set).
fn cpu_list(s: &mut Section<'_>, p: &mut Problems, key: &'static str) -> Option<Vec<usize>> {
    let cpus: Vec<usize> = s.int_array(p, key, 0, 4095)?.into_iter().map(|c| c as usize).collect();
    let mut sorted = cpus.clone();
    sorted.sort_unstable();
    sorted.dedup();
    if sorted.len() != cpus.len() {
        p.push(s.key(key), None, "lists a CPU more than once");
    }
    if cpus.is_empty() {
        p.push(s.key(key), None, "must name at least one CPU (or be left out)");
    }
    if let Some(allowed) = allowed_cpus() {
        let bad: Vec<usize> = cpus.iter().copied().filter(|c| !allowed.contains(c)).collect();
        if !bad.is_empty() {
            let list: Vec<String> = allowed.iter().map(ToString::to_string).collect();
            p.push(
                s.key(key),
                None,
                format!(
                    "CPU(s) {bad:?} are not in this process's allowed set [{}]",
                    list.join(",")
                ),
            );
        }
    }
    Some(cpus)
}

fn percent(s: &mut Section<'_>, p: &mut Problems, key: &'static str) -> Option<u32> {
    let raw = s.get(key)?;
    let parsed = raw
        .as_str()
        .and_then(|t| t.trim().strip_suffix('%'))
        .and_then(|n| n.trim().parse::<u32>().ok())
        .filter(|n| (1..=100_000).contains(n));
    if parsed.is_none() {
        p.push(s.key(key), Some(raw), "expected a share of one CPU such as \"50%\" or \"300%\"");
    }
    parsed
}

fn system(root: &mut Section<'_>, p: &mut Problems, base: &Path) -> SystemConfig {
    let mut out = SystemConfig {
        allow_root: false,
        keep_capabilities: Vec::new(),
        io_cpus: None,
        inference_cpus: None,
        worker_sched: WorkerSchedConfig::Other { nice: 0 },
        cgroup: CgroupConfig {
            mode: CgroupMode::Auto,
            root: PathBuf::from("/sys/fs/cgroup"),
            memory_high: None,
            memory_max: None,
            io_cpu_max: None,
            inference_cpu_max: None,
            queue_memory_fraction: 0.25,
        },
        state_dir: None,
        model_cache: false,
    };
    let Some(mut s) = root.table(p, "system") else { return out };
    out.allow_root = s.bool(p, "allow_root").unwrap_or(false);
    out.state_dir = s.string(p, "state_dir").map(|d| resolve(base, d));
    out.model_cache = s.bool(p, "model_cache").unwrap_or(false);
    out.keep_capabilities = s.string_array(p, "keep_capabilities").unwrap_or_default();
    for c in &out.keep_capabilities {
        let canonical = caps_name(c);
        if !KNOWN_CAPS.contains(&canonical.as_str()) {
            p.push(
                s.key("keep_capabilities"),
                Some(&Value::String(c.clone())),
                "unknown capability name",
            );
        }
    }
    out.io_cpus = cpu_list(&mut s, p, "io_cpus");
    out.inference_cpus = cpu_list(&mut s, p, "inference_cpus");
    let sched = s.choice(p, "worker_sched", &[("other", 0), ("fifo", 1), ("rr", 2)]).unwrap_or(0);
    let nice = s.int(p, "worker_nice", -20, 19).unwrap_or(0) as i32;
    let priority = s.int(p, "worker_priority", 1, 99).unwrap_or(10) as u8;
    out.worker_sched = match sched {
        1 => WorkerSchedConfig::Fifo { priority },
        2 => WorkerSchedConfig::RoundRobin { priority },
        _ => WorkerSchedConfig::Other { nice },
    };
    if let Some(mut c) = s.table(p, "cgroup") {
        let cg = &mut out.cgroup;
        cg.mode = c
            .choice(p, "mode", &[("auto", CgroupMode::Auto), ("off", CgroupMode::Off)])
            .unwrap_or(CgroupMode::Auto);
        if let Some(r) = c.string(p, "root") {
            cg.root = PathBuf::from(r);
        }
        cg.memory_high = c.size(p, "memory_high", 16 << 20, 1 << 40);
        cg.memory_max = c.size(p, "memory_max", 16 << 20, 1 << 40);
        if let (Some(h), Some(m)) = (cg.memory_high, cg.memory_max)
            && h > m
        {
            p.push(c.key("memory_high"), None, "must not exceed memory_max");
        }
        cg.io_cpu_max = percent(&mut c, p, "io_cpu_max");
        cg.inference_cpu_max = percent(&mut c, p, "inference_cpu_max");
        if let Some(f) = c.float(p, "queue_memory_fraction", 0.01, 1.0) {
            cg.queue_memory_fraction = f;
        }
        c.finish(p);
    }
    s.finish(p);
    out
}

/// `sys_nice` / `cap_sys_nice` / `CAP_SYS_NICE` -> `CAP_SYS_NICE`.
pub fn caps_name(s: &str) -> String {
    let up = s.trim().to_ascii_uppercase();
    if up.starts_with("CAP_") { up } else { format!("CAP_{up}") }
}

/// Capability names Linux knows (as of 6.x).
const KNOWN_CAPS: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
];

fn template(
    s: Option<&mut Section<'_>>,
    p: &mut Problems,
    key: &'static str,
    default: &str,
    captures: usize,
) -> TopicTemplate {
    let fallback =
        || TopicTemplate::parse(default, captures).unwrap_or_else(|_| unreachable_template());
    let Some(s) = s else { return fallback() };
    match s.string(p, key) {
        Some(t) => match TopicTemplate::parse(t, captures) {
            Ok(t) => t,
            Err(e) => {
                p.push(s.key(key), Some(&Value::String(t.into())), e);
                fallback()
            }
        },
        None => fallback(),
    }
}

/// Built-in defaults are valid templates; this is only reachable if one of them is edited badly,
/// which the unit tests catch.
fn unreachable_template() -> TopicTemplate {
    TopicTemplate::parse("edgeinfer", 0)
        .unwrap_or_else(|e| panic!("built-in template invalid: {e}"))
}

fn broker(root: &mut Section<'_>, p: &mut Problems, device_id: &str, base: &Path) -> BrokerConfig {
    let mut out = BrokerConfig {
        host: "127.0.0.1".into(),
        port: 1883,
        client_id: format!("edgeinfer-{device_id}"),
        keepalive: Duration::from_secs(30),
        clean_session: false,
        username: None,
        password: None,
        tls: None,
        max_packet_size: 4 << 20,
        connect_timeout: Duration::from_secs(5),
        reconnect_min: Duration::from_millis(250),
        reconnect_max: Duration::from_secs(30),
        inflight: 100,
        max_topic_length: 1024,
        oversized_session_reset: 3,
    };
    let Some(mut s) = root.table(p, "broker") else { return out };
    if let Some(h) = s.string(p, "host") {
        if h.is_empty() {
            p.push(s.key("host"), None, "must not be empty");
        }
        out.host = h.to_string();
    }
    if let Some(mut t) = s.table(p, "tls") {
        let tls = TlsConfig {
            ca_file: t.string(p, "ca_file").map(|f| resolve(base, f)),
            cert_file: t.string(p, "cert_file").map(|f| resolve(base, f)),
            key_file: t.string(p, "key_file").map(|f| resolve(base, f)),
        };
        if tls.cert_file.is_some() != tls.key_file.is_some() {
            p.push(
                t.key("cert_file"),
                None,
                "cert_file and key_file must be given together (mTLS)",
            );
        }
        t.finish(p);
        out.tls = Some(tls);
        out.port = 8883;
    }
    if let Some(port) = s.int(p, "port", 1, 65535) {
        out.port = port as u16;
    }
    if let Some(c) = s.string(p, "client_id") {
        let rendered = c.replace("{device}", device_id);
        if rendered.is_empty() || rendered.len() > 128 || rendered.contains(['{', '}']) {
            p.push(
                s.key("client_id"),
                Some(&Value::String(c.into())),
                "must be 1-128 bytes; `{device}` is the only placeholder",
            );
        }
        out.client_id = rendered;
    }
    if let Some(k) = s.duration(p, "keepalive", Duration::from_secs(5), Duration::from_secs(3600)) {
        out.keepalive = k;
    }
    if let Some(c) = s.bool(p, "clean_session") {
        out.clean_session = c;
    }
    out.username = s.string(p, "username").map(str::to_string);
    let inline = s.string(p, "password").map(|x| Secret::Inline(x.to_string()));
    let file = s.string(p, "password_file").map(|f| Secret::File(resolve(base, f)));
    let credential = s.string(p, "password_credential").and_then(|n| {
        if n.is_empty() || n.contains('/') || n == "." || n == ".." {
            p.push(
                s.key("password_credential"),
                Some(&Value::String(n.into())),
                "a systemd credential name (LoadCredential=<name>:...), without '/'",
            );
            None
        } else {
            Some(Secret::Credential(n.to_string()))
        }
    });
    if [inline.is_some(), file.is_some(), credential.is_some()].iter().filter(|x| **x).count() > 1 {
        p.push(
            s.key("password"),
            None,
            "give one of password, password_file and password_credential",
        );
    }
    out.password = credential.or(file).or(inline);
    if out.password.is_some() && out.username.is_none() {
        p.push(s.key("username"), None, "a password needs a username");
    }
    if let Some(m) = s.size(p, "max_packet_size", 1024, MAX_PAYLOAD_LIMIT) {
        out.max_packet_size = m;
    }
    if let Some(d) =
        s.duration(p, "connect_timeout", Duration::from_secs(1), Duration::from_secs(300))
    {
        out.connect_timeout = d;
    }
    if let Some(d) =
        s.duration(p, "reconnect_min", Duration::from_millis(10), Duration::from_secs(600))
    {
        out.reconnect_min = d;
    }
    if let Some(d) =
        s.duration(p, "reconnect_max", Duration::from_millis(10), Duration::from_secs(3600))
    {
        out.reconnect_max = d;
    }
    if out.reconnect_min > out.reconnect_max {
        p.push(s.key("reconnect_min"), None, "must not exceed reconnect_max");
    }
    if let Some(i) = s.int(p, "inflight", 1, 65535) {
        out.inflight = i as u16;
    }
    if let Some(n) = s.int(p, "max_topic_length", 64, 65535) {
        out.max_topic_length = n as usize;
    }
    if let Some(n) = s.int(p, "oversized_session_reset", 0, 100) {
        out.oversized_session_reset = n as u32;
    }
    s.finish(p);
    out
}

fn pipeline(
    name: &str,
    mut s: Section<'_>,
    p: &mut Problems,
    broker: &BrokerConfig,
    base: &Path,
    inference_cpus: usize,
) -> Option<PipelineConfig> {
    let model = match s.string(p, "model") {
        Some(m) if !m.is_empty() => Some(resolve(base, m)),
        Some(_) => {
            p.push(s.key("model"), None, "must not be empty");
            None
        }
        None => {
            p.push(s.key("model"), None, "missing: path of the ONNX model file");
            None
        }
    };
    let model_version = s.string(p, "model_version").map(str::to_string);
    let input = match s.string(p, "input") {
        Some(f) => match TopicFilter::parse(f) {
            Ok(f) => Some(f),
            Err(e) => {
                p.push(s.key("input"), Some(&Value::String(f.into())), e);
                None
            }
        },
        None => {
            p.push(
                s.key("input"),
                None,
                "missing: MQTT topic filter to subscribe to, e.g. \"sensors/+/frames\"",
            );
            None
        }
    };
    let captures = input.as_ref().map_or(0, TopicFilter::wildcard_count);
    let output =
        template(Some(&mut s), p, "output", "edgeinfer/{device}/results/{pipeline}", captures);
    let format = s.choice(
        p,
        "format",
        &[
            ("raw", PayloadFormat::Raw),
            ("json", PayloadFormat::Json),
            ("jpeg", PayloadFormat::Jpeg),
            ("png", PayloadFormat::Png),
            ("cbor", PayloadFormat::Cbor),
            ("pcm_s16le", PayloadFormat::PcmS16le),
        ],
    );
    let image = image::parse(&mut s, p, format.unwrap_or(PayloadFormat::Json));
    let format = format.unwrap_or(PayloadFormat::Json);
    let qos = qos(&mut s, p, "qos", Qos::AtLeastOnce);
    let max_payload =
        s.size(p, "max_payload", 1, broker.max_packet_size).unwrap_or(broker.max_packet_size);
    let (envelope, window) = window::parse(&mut s, p, format, max_payload);
    let nan = s
        .choice(p, "nan", &[("reject", NanPolicy::Reject), ("allow", NanPolicy::Allow)])
        .unwrap_or(NanPolicy::Reject);
    let mut input_shapes = BTreeMap::new();
    if let Some(mut shapes) = s.table(p, "input_shapes") {
        let entries: Vec<(String, Value)> =
            shapes.entries().map(|(k, v)| (k.clone(), v.clone())).collect();
        for (k, v) in entries {
            let key = shapes.key(&k);
            let dims = v.as_array().and_then(|a| {
                a.iter()
                    .map(|d| {
                        d.as_integer().filter(|n| (1..=1 << 24).contains(n)).map(|n| n as usize)
                    })
                    .collect::<Option<Vec<usize>>>()
            });
            match dims {
                Some(d) if !d.is_empty() && d.len() <= 8 => {
                    input_shapes.insert(k, d);
                }
                _ => p.push(
                    key,
                    Some(&v),
                    "expected an array of 1 to 8 positive dimensions, e.g. [1, 3, 224, 224]",
                ),
            }
        }
        shapes.finish(p);
    }
    let workers = s.int(p, "workers", 1, 256).map_or(1, |n| n as usize);
    let max_batch = s.int(p, "max_batch", 1, MAX_BATCH as i64).map_or(1, |n| n as usize);
    let cpus = cpu_list(&mut s, p, "cpus").unwrap_or_default();
    let queue = {
        let mut q = s.table(p, "queue");
        let capacity =
            q.as_mut().and_then(|q| q.int(p, "capacity", 1, 1 << 20)).map_or(32, |n| n as usize);
        let policy = q
            .as_mut()
            .and_then(|q| {
                q.choice(
                    p,
                    "policy",
                    &[
                        ("drop_oldest", DropPolicy::DropOldest),
                        ("drop_newest", DropPolicy::DropNewest),
                        ("block", DropPolicy::Block),
                    ],
                )
            })
            .unwrap_or(DropPolicy::DropOldest);
        let block_timeout = q
            .as_mut()
            .and_then(|q| {
                q.duration(p, "block_timeout", Duration::from_millis(1), Duration::from_secs(60))
            })
            .unwrap_or(Duration::from_secs(1));
        if let Some(q) = q {
            q.finish(p);
        }
        QueueConfig { capacity, policy, block_timeout }
    };
    let postprocess = match s.table(p, "postprocess") {
        None => PostProcess::Raw,
        Some(mut pp) => {
            let kind = pp
                .choice(
                    p,
                    "kind",
                    &[
                        ("raw", 0),
                        ("classification", 1),
                        ("detection", 2),
                        ("regression", 3),
                        ("anomaly_score", 4),
                    ],
                )
                .unwrap_or(0);
            let out = match kind {
                1 => PostProcess::Classification(ClassificationConfig {
                    top_k: pp.int(p, "top_k", 1, 1000).map_or(5, |n| n as usize),
                    labels: pp.string(p, "labels").map(|l| resolve(base, l)),
                    output: pp.string(p, "output").map(str::to_string),
                    softmax: pp.bool(p, "softmax").unwrap_or(false),
                    score_threshold: pp.float(p, "score_threshold", -f64::MAX, f64::MAX),
                    include_outputs: pp.bool(p, "include_outputs").unwrap_or(true),
                }),
                2 => PostProcess::Detection(DetectionConfig {
                    layout: pp
                        .choice(
                            p,
                            "layout",
                            &[("yolov8", YoloLayout::V8), ("yolov5", YoloLayout::V5)],
                        )
                        .unwrap_or(YoloLayout::V8),
                    labels: pp.string(p, "labels").map(|l| resolve(base, l)),
                    output: pp.string(p, "output").map(str::to_string),
                    score_threshold: pp.float(p, "score_threshold", 0.0, 1.0).unwrap_or(0.25)
                        as f32,
                    iou_threshold: pp.float(p, "iou_threshold", 0.0, 1.0).unwrap_or(0.45) as f32,
                    max_detections: pp
                        .int(p, "max_detections", 1, 10_000)
                        .map_or(100, |n| n as usize),
                    max_candidates: pp
                        .int(p, "max_candidates", 1, 1_000_000)
                        .map_or(30_000, |n| n as usize),
                    class_agnostic: pp.bool(p, "class_agnostic").unwrap_or(false),
                    include_outputs: pp.bool(p, "include_outputs").unwrap_or(false),
                }),
                3 => PostProcess::Regression(events::value_config(&mut pp, p, false)),
                4 => PostProcess::AnomalyScore(events::value_config(&mut pp, p, true)),
                _ => PostProcess::Raw,
            };
            pp.finish(p);
            out
        }
    };
    let events = events::parse(&mut s, p, &postprocess);
    let watch_model = s.bool(p, "watch_model").unwrap_or(true);
    let dedup = s.bool(p, "dedup").unwrap_or(true);
    let golden_tolerance = s.float(p, "golden_tolerance", 0.0, 1.0).unwrap_or(1e-4);
    let require_golden = s.bool(p, "require_golden").unwrap_or(false);
    let probation = s
        .duration(p, "probation", Duration::ZERO, Duration::from_secs(86400))
        .unwrap_or(Duration::from_secs(60));
    let probation_min_frames =
        s.int(p, "probation_min_frames", 1, 1 << 30).map_or(50, |n| n as u64);
    let probation_latency_ratio = s.float(p, "probation_latency_ratio", 1.0, 100.0).unwrap_or(1.5);
    let probation_latency_floor = s
        .duration(p, "probation_latency_floor", Duration::ZERO, Duration::from_secs(60))
        .unwrap_or(Duration::from_millis(1));
    let probation_error_rate = s.float(p, "probation_error_rate", 0.0, 1.0).unwrap_or(0.01);
    let max_age = s.duration(p, "max_age", Duration::from_millis(1), Duration::from_secs(86400));
    let deadline = s.duration(p, "deadline", Duration::from_millis(1), Duration::from_secs(86400));
    let slo = match s.table(p, "slo") {
        None => SloConfig::default(),
        Some(mut t) => {
            let objective =
                t.duration(p, "latency", Duration::from_micros(100), Duration::from_secs(3600));
            let quantile = t.float(p, "latency_quantile", 0.5, 0.99999).unwrap_or(0.99);
            let latency_window = t
                .duration(
                    p,
                    "latency_window",
                    Duration::from_secs(1),
                    Duration::from_secs(86400 * 7),
                )
                .unwrap_or(Duration::from_secs(300));
            let served = t.float(p, "served", 0.5, 0.99999);
            let served_window = t
                .duration(
                    p,
                    "served_window",
                    Duration::from_secs(1),
                    Duration::from_secs(86400 * 7),
                )
                .unwrap_or(Duration::from_secs(3600));
            let min_frames = t.int(p, "min_frames", 1, 1 << 30).map_or(100, |n| n as u64);
            t.finish(p);
            SloConfig {
                latency: objective.map(|objective| LatencySlo {
                    objective,
                    quantile,
                    window: latency_window,
                }),
                served: served.map(|ratio| ServedSlo { ratio, window: served_window }),
                min_frames,
            }
        }
    };
    let overload = match s.table(p, "overload") {
        None => OverloadConfig::default(),
        Some(mut t) => {
            let d = OverloadConfig::default();
            let c = OverloadConfig {
                adaptive: t.bool(p, "adaptive").unwrap_or(d.adaptive),
                interval: t
                    .duration(p, "interval", Duration::from_millis(10), Duration::from_secs(60))
                    .unwrap_or(d.interval),
            };
            t.finish(p);
            c
        }
    };
    let engine = engine::parse(&mut s, p);
    engine::check_cpus(&format!("pipelines.{name}"), workers, &engine, &cpus, inference_cpus, p);
    s.finish(p);
    Some(PipelineConfig {
        engine,
        dedup,
        watch_model,
        golden_tolerance,
        require_golden,
        probation,
        probation_min_frames,
        probation_latency_ratio,
        probation_latency_floor,
        probation_error_rate,
        max_age,
        deadline,
        slo,
        overload,
        name: name.to_string(),
        model: model?,
        model_version,
        input: input?,
        output,
        format,
        image,
        envelope,
        window,
        qos,
        max_payload,
        nan,
        input_shapes,
        workers,
        max_batch,
        cpus,
        queue,
        postprocess,
        events,
    })
}

#[cfg(test)]
mod tests;
