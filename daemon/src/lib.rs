//! edgeinfer: an edge-appliance inference daemon. MQTT frames in, ONNX inference with tract on
//! dedicated worker threads, results, health and metrics out.
//!
//! Module map (dependencies flow downwards; `app` wires the rest):
//! - [`cli`]: command line and subcommands.
//! - [`app`]: start-up sequence, serving loop, shutdown.
//! - [`pipeline`]: decode -> bounded queue -> workers -> results.
//! - [`mqtt`]: client options (session, TLS, Last Will) and the publisher used by workers.
//! - [`model`]: tract behind our own `Model`/`Session` types; `model::cache`: its fast-start
//!   cache of decluttered graphs.
//! - [`telemetry`]: counters, histograms, accounting reasons.
//! - [`publish`]: the `Publisher` trait; [`reject`]: why a frame is refused. Both at the
//!   bottom: they import nothing but `config`.
//! - [`config`]: the TOML file and its validation; [`topic`]: filters and templates.
//! - [`spool`]: results kept on disk while the broker is unreachable.
//! - [`health_check`]: `edgeinfer health --wait`, the A/B update commit gate.
//! - [`logging`]: the process logger. `demo` (feature): in-process broker and sensors.

pub mod app;
pub mod cli;
pub mod config;
#[cfg(feature = "demo")]
pub mod demo;
pub mod exit;
#[cfg(feature = "fault-hooks")]
pub mod fault;
pub mod health_check;
pub mod logging;
pub mod model;
pub mod mqtt;
pub mod ota;
pub mod pipeline;
pub mod publish;
pub mod reject;
pub mod spool;
pub mod sys;
pub mod telemetry;
pub mod topic;
