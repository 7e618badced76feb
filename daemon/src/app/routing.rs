//! Where a message goes: the subscriptions the daemon makes, frames handed to the pipelines
//! whose filters match, over-long topics rejected, and the reload command's payload.

use std::sync::atomic::Ordering;

use bytes::Bytes;
use rumqttc::{QoS, SubscribeFilter};
use smallvec::SmallVec;

use super::App;
use crate::mqtt;
use crate::publish::Publisher;
use crate::topic::Captures;

/// A message on a topic longer than `broker.max_topic_length`: rejected (`topic_too_long`) by
/// every pipeline whose filter it matches, counted in the transport otherwise. Nothing keeps the
/// topic.
pub(super) fn reject_long_topic(app: &App, topic: &str, publisher: &dyn Publisher) {
    app.transport.long_topics.fetch_add(1, Ordering::Relaxed);
    let limit = app.config.broker.max_topic_length;
    let mut matched = false;
    for p in &app.pipelines {
        if p.cfg.input.matches(topic).is_some() {
            matched = true;
            p.reject_long_topic(topic, limit, publisher);
        }
    }
    if !matched {
        log::debug!(
            "message on a {}-byte topic ({}…) above broker.max_topic_length matched no pipeline",
            topic.len(),
            crate::topic::shorten(topic, 64)
        );
    }
}

/// Which pipelines a reload command names: an empty payload or `{}` means all of them,
/// `{"pipeline": "name"}` one.
pub(super) fn reload_targets(app: &App, payload: &[u8]) -> Result<Vec<usize>, String> {
    let all = || (0..app.pipelines.len()).collect();
    if payload.iter().all(u8::is_ascii_whitespace) {
        return Ok(all());
    }
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Cmd {
        pipeline: Option<String>,
    }
    let cmd: Cmd = serde_json::from_slice(payload)
        .map_err(|e| format!("expected {{\"pipeline\": \"name\"}} or an empty payload: {e}"))?;
    match cmd.pipeline {
        None => Ok(all()),
        Some(name) => app
            .pipelines
            .iter()
            .position(|p| p.name() == name)
            .map(|i| vec![i])
            .ok_or_else(|| format!("no pipeline named {name:?}")),
    }
}

/// One subscription per distinct filter (two pipelines may share a stream), at the highest QoS
/// any of them asks for, plus the reload command topic.
pub(super) fn subscriptions(app: &App) -> Vec<SubscribeFilter> {
    let mut out: Vec<SubscribeFilter> = Vec::new();
    if let Some(t) = &app.config.commands.reload_topic {
        out.push(SubscribeFilter::new(t.render(&app.config.device_id, ""), QoS::AtLeastOnce));
    }
    if app.config.ota.enabled {
        let base = app.config.ota.topic.render(&app.config.device_id, "");
        out.push(SubscribeFilter::new(format!("{base}/+/manifest"), QoS::AtLeastOnce));
        out.push(SubscribeFilter::new(format!("{base}/+/chunk/+"), QoS::AtLeastOnce));
    }
    for p in &app.pipelines {
        let q = mqtt::qos(p.cfg.qos);
        match out.iter_mut().find(|s| s.path == p.cfg.input.as_str()) {
            Some(s) => {
                if (q as u8) > (s.qos as u8) {
                    s.qos = q;
                }
            }
            None => out.push(SubscribeFilter::new(p.cfg.input.as_str().to_string(), q)),
        }
    }
    out
}

/// Hands a frame to every pipeline whose filter matches its topic. The topic string moves into
/// the last matching pipeline's frame; only fan-out to several pipelines copies it.
pub(super) async fn route(app: &App, topic: String, payload: Bytes, publisher: &dyn Publisher) {
    let matches: SmallVec<[(usize, Captures); 2]> = app
        .pipelines
        .iter()
        .enumerate()
        .filter_map(|(i, p)| p.cfg.input.matches(&topic).map(|c| (i, c)))
        .collect();
    if matches.is_empty() {
        // Overlapping subscriptions of a resumed session, or a broker bridging extra topics.
        app.transport.unrouted.fetch_add(1, Ordering::Relaxed);
        log::debug!("message on {topic} matched no pipeline");
        return;
    }
    let last = matches.len() - 1;
    let mut topic = Some(topic);
    for (n, (i, captures)) in matches.into_iter().enumerate() {
        let p = &app.pipelines[i];
        let t = if n == last {
            topic.take().unwrap_or_default()
        } else {
            topic.clone().unwrap_or_default()
        };
        if let Some(frame) = p.ingest(t, captures, payload.clone(), publisher) {
            // `block` policy: back-pressure by not reading further messages until there is room.
            let outcome = p.queue.push_wait(frame, p.cfg.queue.block_timeout).await;
            p.account_push(outcome);
        }
    }
}
