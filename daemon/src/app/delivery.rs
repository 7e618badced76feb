//! Model delivery over MQTT in the serving loop: OTA messages to the receiver, its answers to
//! the status topic, verification on a thread of its own, and the swap of a verified file.

use std::sync::Arc;

use super::{App, reload};
use crate::config::Qos;
use crate::ota;
use crate::publish::Publisher;

/// What handling an OTA message needs from the serving loop.
pub(super) struct OtaCtx<'a> {
    pub(super) app: &'a Arc<App>,
    pub(super) publisher: &'a dyn Publisher,
    pub(super) base: &'a str,
    pub(super) reloader: &'a reload::Reloader,
    pub(super) done: &'a tokio::sync::mpsc::UnboundedSender<reload::SwapReportFor>,
    /// Where verification threads report (pipeline, outcome).
    pub(super) verified: &'a tokio::sync::mpsc::UnboundedSender<(String, ota::Outcome)>,
}

/// Feeds a message on `<base>/<pipeline>/{manifest,chunk/<n>}` to the receiver, publishes the
/// status, and starts the swap of a verified delivery (its status is completed when the swap
/// reports, see `installing`).
pub(super) fn handle_ota(
    ctx: &OtaCtx<'_>,
    rx: &mut ota::Receiver,
    topic: &str,
    payload: &[u8],
    installing: &mut [Option<ota::Status>],
) {
    let rest = topic.get(ctx.base.len() + 1..).unwrap_or_default();
    let mut parts = rest.splitn(3, '/');
    let (pipeline, kind, n) =
        (parts.next().unwrap_or(""), parts.next().unwrap_or(""), parts.next());
    let known = ctx.app.pipelines.iter().any(|x| x.name() == pipeline);
    let outcome = match (kind, n) {
        ("manifest", None) => rx.on_manifest(pipeline, known, payload, ota::unix_now()),
        ("chunk", Some(n)) if known => rx.on_chunk(pipeline, n, payload),
        _ => ota::Outcome::Quiet,
    };
    ota_outcome(ctx, pipeline, outcome, installing);
}

/// Publishes what an OTA message or verification led to; starts the verification of a complete
/// file on a thread of its own (hashing a large model would stall the serving loop) and the
/// swap of a verified one.
pub(super) fn ota_outcome(
    ctx: &OtaCtx<'_>,
    pipeline: &str,
    outcome: ota::Outcome,
    installing: &mut [Option<ota::Status>],
) {
    match outcome {
        ota::Outcome::Quiet => {}
        ota::Outcome::Status(st) => {
            if st.state == "rejected" {
                log::warn!(
                    pipeline = crate::topic::shorten(pipeline, 64);
                    "OTA rejected: {}",
                    st.reason.as_deref().unwrap_or("?")
                );
            }
            publish_ota(ctx.publisher, ctx.base, &st);
        }
        ota::Outcome::Verify(v) => {
            publish_ota(ctx.publisher, ctx.base, &v.status);
            let (tx, name) = (ctx.verified.clone(), pipeline.to_string());
            let spawned =
                std::thread::Builder::new().name("ei-ota-verify".into()).spawn(move || {
                    let _ = tx.send((name, v.run()));
                });
            if let Err(e) = spawned {
                log::error!(pipeline = pipeline; "cannot start the OTA verification: {e}");
            }
        }
        ota::Outcome::Install(ota::Install { status: st, staged }) => {
            log::info!(
                pipeline = pipeline;
                "OTA: version {} (release {}) received and verified ({} chunks); checking it before it is put in place",
                st.version,
                st.release,
                st.chunks
            );
            publish_ota(ctx.publisher, ctx.base, &st);
            let idx = ctx.app.pipelines.iter().position(|x| x.name() == pipeline);
            match (idx, idx.and_then(|i| installing.get_mut(i))) {
                (Some(i), Some(slot)) => {
                    *slot = Some(st);
                    ctx.reloader.start_staged(ctx.app, i, staged, ctx.done.clone());
                }
                _ => {
                    let _ = std::fs::remove_file(&staged);
                }
            }
        }
    }
}

/// Opens the OTA receiver in `<state_dir>/ota` with the trusted keys; logs why not.
pub(super) fn open_ota(app: &App) -> Option<ota::Receiver> {
    let cfg = &app.config;
    let Some(state) = cfg.system.state_dir() else {
        log::error!(
            "ota.enabled needs a state directory (system.state_dir or the unit's StateDirectory=); OTA is off"
        );
        return None;
    };
    let mut keys = std::collections::BTreeMap::new();
    for (id, b64) in &cfg.ota.trusted_keys {
        match ota::parse_public_key(b64) {
            Ok(k) => {
                keys.insert(id.clone(), k);
            }
            Err(e) => log::error!("ota.trusted_keys.{id}: {e}; key ignored"),
        }
    }
    let settings = ota::Settings {
        dir: state.join("ota"),
        max_size: cfg.ota.max_size,
        min_free: cfg.ota.min_free,
        keys,
        device_id: cfg.device_id.clone(),
        groups: cfg.ota.groups.clone(),
        pipelines: app.pipelines.iter().map(|p| p.name().to_string()).collect(),
    };
    match ota::Receiver::open(settings) {
        Ok(r) => {
            log::info!(
                "OTA model delivery on {}/<pipeline>/...",
                cfg.ota.topic.render(&cfg.device_id, "")
            );
            Some(r)
        }
        Err(e) => {
            log::error!("OTA is off: {e}");
            None
        }
    }
}

/// Publishes an OTA status: retained for the state of a transfer (a sender that connects later
/// sees where things stand), not retained for the answer to a refused offer.
pub(super) fn publish_ota(publisher: &dyn Publisher, base: &str, st: &ota::Status) {
    let topic = format!("{base}/{}/status", st.pipeline);
    if let Ok(payload) = serde_json::to_vec(st) {
        let _ = publisher.try_publish(&topic, payload, Qos::AtLeastOnce, st.retain);
    }
}
