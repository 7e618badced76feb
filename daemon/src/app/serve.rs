//! The serving loop: one task owns the rumqttc event loop (connect, reconnect with backoff,
//! subscribe, route frames, acknowledge), publishes health and metrics, and runs the one shutdown
//! path: first signal -> drain within the grace period -> offline status -> explicit disconnect
//! (polled until written, since rumqttc never reports the request stream as done) -> return.
//! A second signal returns at once.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use rumqttc::{
    AsyncClient, ConnectionError, Event, EventLoop, Outgoing, Packet, Publish, QoS, Request,
    StateError, SubscribeFilter,
};
use smallvec::SmallVec;
use tokio::signal::unix::{SignalKind, signal};
use tokio::time::{Instant, MissedTickBehavior, interval, interval_at, sleep_until};

use super::{App, AppError, StopHandle, control, reload, status};
use crate::config::Qos;
use crate::mqtt;
use crate::ota;
use crate::pipeline::swap::SwapResult;
use crate::pipeline::{Publisher, WorkerHandle};
use crate::sys::notify::{self, Notifier};
use crate::telemetry::DropReason;
use crate::topic::Captures;

/// How long the goodbye (offline status + DISCONNECT) may take once draining is over.
const FAREWELL_TIMEOUT: Duration = Duration::from_secs(3);

enum Phase {
    Running,
    /// Intake stopped; workers finish what is queued.
    Draining {
        deadline: Instant,
    },
    /// Offline status and DISCONNECT requested; waiting for them to be written.
    Farewell {
        deadline: Instant,
    },
}

/// Connection bookkeeping for backoff and log levels.
struct Link {
    connected: bool,
    ever_connected: bool,
    failures: u32,
    backoff: Duration,
    retry_at: Option<Instant>,
    /// When the current connection was acknowledged.
    connected_at: Option<Instant>,
    poison: PoisonGuard,
}

/// The size of the packet that ended a connection because it was above
/// `broker.max_packet_size` (the client cannot read it), if that is what happened.
fn oversized(e: &ConnectionError) -> Option<usize> {
    match e {
        ConnectionError::MqttState(StateError::Deserialization(
            rumqttc::Error::PayloadSizeLimitExceeded(n),
        )) => Some(*n),
        _ => None,
    }
}

impl Link {
    fn on_error(
        &mut self,
        app: &App,
        e: &ConnectionError,
        min: Duration,
        max: Duration,
        target: &str,
    ) {
        app.transport.connection_errors.fetch_add(1, Ordering::Relaxed);
        if let Some(n) = oversized(e) {
            // The client cannot even read such a packet, so no pipeline sees it. A QoS 1 one is
            // redelivered on every reconnect of a persistent session until the broker drops it.
            app.transport.oversized_packets.fetch_add(1, Ordering::Relaxed);
            log::error!(
                "broker sent a {n}-byte packet, above broker.max_packet_size ({}); the connection is reset. \
                 hint: limit the broker's max_packet_size to this value so it refuses such frames at the source",
                app.config.broker.max_packet_size
            );
        }
        if self.connected {
            log::warn!("lost connection to broker {target}: {e}; reconnecting");
            self.backoff = min;
        } else if self.failures == 0 {
            let hint = if self.ever_connected {
                ""
            } else {
                " (the daemon keeps serving nothing until it connects)"
            };
            log::warn!(
                "cannot connect to broker {target}: {e}; retrying with backoff up to {max:?}{hint}"
            );
        } else {
            log::debug!("broker {target} still unreachable (attempt {}): {e}", self.failures + 1);
        }
        self.connected = false;
        self.failures += 1;
        self.retry_at = Some(Instant::now() + self.backoff);
        self.backoff = (self.backoff * 2).min(max);
    }
}

/// A connection that lived longer than this before an oversized packet reset it starts a new
/// streak: a redelivered frame arrives right after the CONNACK, not minutes later.
const POISON_STREAK_WINDOW: Duration = Duration::from_secs(30);

/// Where clearing the session to drop a redelivered oversized frame stands.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum SessionReset {
    #[default]
    Idle,
    /// Connecting with a clean session: the broker discards the session and its queue.
    Clearing,
    /// Connected with the clean session; DISCONNECT sent so the next connection is persistent
    /// again (a clean session would last as long as that connection).
    Disconnecting,
    /// Reconnecting with the persistent session (new, so subscriptions are made again).
    Restoring,
}

/// A packet above `broker.max_packet_size` resets the connection, and on a persistent session
/// the broker redelivers a QoS 1 one at every reconnect: the daemon would never serve again.
/// This counts consecutive such resets and decides when to clear the session once
/// (`broker.oversized_session_reset`); the steps of the reset itself are `SessionReset`.
#[derive(Debug, Default)]
struct PoisonGuard {
    /// Consecutive connections ended by an oversized packet.
    streak: u32,
    /// Size of the last oversized packet.
    last_size: usize,
    state: SessionReset,
}

impl PoisonGuard {
    /// A connection ended: by an oversized packet of `size` bytes (or another error: `None`)
    /// after being up for `lived`. True when the session must be cleared now (`limit`
    /// consecutive oversized resets; 0 never).
    fn on_reset(&mut self, size: Option<usize>, lived: Option<Duration>, limit: u32) -> bool {
        let Some(size) = size else {
            self.streak = 0;
            return false;
        };
        if lived.is_some_and(|l| l > POISON_STREAK_WINDOW) {
            self.streak = 0;
        }
        self.streak += 1;
        self.last_size = size;
        if limit > 0 && self.streak >= limit && self.state == SessionReset::Idle {
            self.state = SessionReset::Clearing;
            return true;
        }
        false
    }
}

/// Feeds the systemd watchdog only while every worker shows progress: a worker's counter moves
/// on every frame and on every idle tick, so one that stops moving is wedged in a frame.
struct Watchdog {
    period: Duration,
    last: Vec<(u64, Instant)>,
    stalled: bool,
}

impl Watchdog {
    /// True when every worker made progress within half the watchdog period (or has exited).
    fn all_alive(&mut self, workers: &[WorkerHandle]) -> bool {
        let now = Instant::now();
        let mut alive = true;
        for (w, last) in workers.iter().zip(self.last.iter_mut()) {
            let c = w.progress.load(Ordering::Relaxed);
            if c != last.0 {
                *last = (c, now);
            } else if !w.thread.is_finished() && now.duration_since(last.1) >= self.period / 2 {
                if !self.stalled {
                    log::error!(
                        "worker {} made no progress for {:?}: withholding watchdog pings so systemd restarts the service",
                        w.name,
                        now.duration_since(last.1)
                    );
                }
                alive = false;
            }
        }
        self.stalled = !alive;
        alive
    }
}

pub(super) async fn serve(
    app: &Arc<App>,
    client: AsyncClient,
    mut el: EventLoop,
    workers: &[WorkerHandle],
    publisher: Arc<dyn Publisher>,
    stop: StopHandle,
    notifier: &Notifier,
) -> Result<(), AppError> {
    let cfg = &app.config;
    let target = format!("{}:{}", cfg.broker.host, cfg.broker.port);
    let health_topic = cfg.health.topic.render(&cfg.device_id, "");
    let metrics_topic = cfg.metrics.topic.render(&cfg.device_id, "");
    let subscriptions = subscriptions(app);

    let mut sigterm = signal(SignalKind::terminate()).map_err(AppError::Signals)?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(AppError::Signals)?;
    // SIGHUP's default action would kill the daemon (`systemctl reload`); catch it.
    let mut sighup = signal(SignalKind::hangup()).map_err(AppError::Signals)?;
    let mut stop_rx = stop.subscribe();

    let mut health = interval_at(Instant::now() + cfg.health.interval, cfg.health.interval);
    health.set_missed_tick_behavior(MissedTickBehavior::Skip);
    let metrics_every = cfg.metrics.interval.unwrap_or(Duration::from_secs(3600));
    let mut metrics = interval_at(Instant::now() + metrics_every, metrics_every);
    metrics.set_missed_tick_behavior(MissedTickBehavior::Skip);
    let mut control_tick = interval(control::period(app));
    control_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut control_state = control::ControlState::new(app);
    let mut drain_check = interval(Duration::from_millis(20));
    let watchdog_period = if notifier.enabled() { notify::watchdog_period() } else { None };
    let mut watchdog = watchdog_period.map(|period| Watchdog {
        period,
        last: workers
            .iter()
            .map(|w| (w.progress.load(Ordering::Relaxed), Instant::now()))
            .collect(),
        stalled: false,
    });
    if let Some(p) = watchdog_period {
        log::info!("systemd watchdog every {p:?}: pinging while every worker makes progress");
    }
    let mut watchdog_tick = interval(
        watchdog_period
            .map_or(Duration::from_secs(3600), |p| (p / 4).max(Duration::from_millis(50))),
    );
    let mut ready_sent = false;

    // Hot model swaps: reload threads report here; file changes arrive from the watch thread.
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel::<reload::SwapReportFor>();
    let (file_tx, mut file_rx) = tokio::sync::mpsc::unbounded_channel::<usize>();
    let _keep_file_channel = file_tx.clone();
    if let Err(e) = reload::watch(app, Duration::from_millis(500), file_tx) {
        log::warn!("cannot watch model files ({e}); SIGHUP and the reload command still work");
    }
    let reloader = reload::Reloader::new(app);
    // Pipelines a SIGHUP is still reloading (READY=1 follows RELOADING=1 once all are done).
    let mut awaiting_reload = vec![false; app.pipelines.len()];
    let reload_topic = cfg.commands.reload_topic.as_ref().map(|t| t.render(&cfg.device_id, ""));
    // Model delivery over MQTT: staged transfers resume across restarts.
    let ota_base = cfg.ota.enabled.then(|| cfg.ota.topic.render(&cfg.device_id, ""));
    let mut ota = ota_base.as_ref().and_then(|_| open_ota(app));
    let mut ota_installing: Vec<Option<ota::Status>> = vec![None; app.pipelines.len()];
    let (verified_tx, mut verified_rx) =
        tokio::sync::mpsc::unbounded_channel::<(String, ota::Outcome)>();
    let events_topic = cfg.commands.events_topic.render(&cfg.device_id, "");

    let (min, max) = (cfg.broker.reconnect_min, cfg.broker.reconnect_max);
    let mut link = Link {
        connected: false,
        ever_connected: false,
        failures: 0,
        backoff: min,
        retry_at: None,
        connected_at: None,
        poison: PoisonGuard::default(),
    };
    let max_topic = cfg.broker.max_topic_length;
    let mut phase = Phase::Running;
    let mut stops = 0u32;
    let mut deferred = 0u64;
    // What the MQTT client still held (unacknowledged or unsent) when the connection failed;
    // given back to it at the next CONNACK (see `resume`).
    let mut held: VecDeque<Request> = VecDeque::new();

    loop {
        let mut stop_requested = false;
        tokio::select! {
            _ = sigterm.recv() => stop_requested = true,
            _ = sigint.recv() => stop_requested = true,
            changed = stop_rx.changed() => stop_requested = changed.is_ok(),
            _ = sighup.recv() => {
                let _ = notifier.reloading();
                log::info!("SIGHUP: reloading model files (configuration changes need a restart)");
                for (i, waiting) in awaiting_reload.iter_mut().enumerate() {
                    *waiting = true;
                    reloader.start(app, i, "sighup", done_tx.clone());
                }
                if app.pipelines.is_empty() {
                    let _ = notifier.ready(&status::status_line(app, link.connected));
                }
            }
            Some((pipeline, outcome)) = verified_rx.recv() => {
                if let Some(base) = ota_base.as_deref() {
                    let ctx = OtaCtx { app, publisher: &*publisher, base, reloader: &reloader, done: &done_tx, verified: &verified_tx };
                    ota_outcome(&ctx, &pipeline, outcome, &mut ota_installing);
                }
            }
            Some(idx) = file_rx.recv() => {
                reloader.start(app, idx, "file", done_tx.clone());
            }
            Some(done) = done_rx.recv() => {
                if let Some(p) = app.pipelines.get(done.pipeline) {
                    let mut v = serde_json::to_value(&done.report).unwrap_or_default();
                    if let serde_json::Value::Object(o) = &mut v {
                        let event = match done.report.result {
                            SwapResult::Kept | SwapResult::RolledBack => "model_probation",
                            _ => "model_swap",
                        };
                        o.insert("event".into(), event.into());
                        o.insert("pipeline".into(), p.name().into());
                        o.insert("device".into(), cfg.device_id.clone().into());
                    }
                    if link.connected {
                        let payload = serde_json::to_vec(&v).unwrap_or_default();
                        let _ = publisher.try_publish(&events_topic, payload, Qos::AtLeastOnce, false);
                        let _ = publisher.try_publish(&health_topic, status::online(app), Qos::AtLeastOnce, true);
                    }
                }
                if done.report.trigger == "ota"
                    && let Some(mut st) = ota_installing.get_mut(done.pipeline).and_then(Option::take)
                {
                    st.state = match done.report.result {
                        SwapResult::Swapped | SwapResult::Unchanged => "installed",
                        _ => "rejected",
                    };
                    st.reason = done.report.reason.clone();
                    st.missing.clear();
                    if let Some(base) = ota_base.as_deref() {
                        publish_ota(&*publisher, base, &st);
                    }
                }
                let was_waiting = awaiting_reload.iter().any(|w| *w);
                let probation = matches!(done.report.result, SwapResult::Kept | SwapResult::RolledBack);
                if !probation && let Some(w) = awaiting_reload.get_mut(done.pipeline) {
                    *w = false;
                }
                if was_waiting && !awaiting_reload.iter().any(|w| *w) {
                    let _ = notifier.ready(&status::status_line(app, link.connected));
                }
            }
            // Pings start once READY=1 is out.
            _ = watchdog_tick.tick(), if watchdog.is_some() && ready_sent => {
                if let Some(w) = watchdog.as_mut()
                    && w.all_alive(workers)
                {
                    let _ = notifier.watchdog();
                }
            }

            _ = sleep_until(link.retry_at.unwrap_or_else(Instant::now)), if link.retry_at.is_some() => {
                link.retry_at = None;
            }

            ev = el.poll(), if link.retry_at.is_none() => match ev {
                Ok(Event::Incoming(Packet::Publish(p))) if p.topic.len() > max_topic => {
                    // Before anything reads the topic: never routed, never remembered per device.
                    if let Some(a) = ack_for(&p) {
                        let _ = client.try_ack(&a);
                    }
                    reject_long_topic(app, &p.topic, &*publisher);
                }
                Ok(Event::Incoming(Packet::Publish(p))) if ota_base.as_deref().is_some_and(|b| p.topic.strip_prefix(b).is_some_and(|r| r.starts_with('/'))) => {
                    if let Some(a) = ack_for(&p) {
                        let _ = client.try_ack(&a);
                    }
                    if let (Some(rx), Some(base), true) = (ota.as_mut(), ota_base.as_deref(), matches!(phase, Phase::Running)) {
                        let ctx = OtaCtx { app, publisher: &*publisher, base, reloader: &reloader, done: &done_tx, verified: &verified_tx };
                        handle_ota(&ctx, rx, &p.topic, &p.payload, &mut ota_installing);
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) if reload_topic.as_deref() == Some(p.topic.as_str()) => {
                    // A command, not a frame: acknowledge and act (only while running).
                    if let Some(a) = ack_for(&p) {
                        let _ = client.try_ack(&a);
                    }
                    if matches!(phase, Phase::Running) {
                        match reload_targets(app, &p.payload) {
                            Ok(targets) => {
                                log::info!("reload command for {} pipeline(s)", targets.len());
                                for i in targets {
                                    reloader.start(app, i, "command", done_tx.clone());
                                }
                            }
                            Err(e) => {
                                log::warn!("reload command refused: {e}");
                                if link.connected {
                                    let v = serde_json::json!({"event": "command_error", "device": cfg.device_id, "command": "reload", "reason": e});
                                    let _ = publisher.try_publish(&events_topic, serde_json::to_vec(&v).unwrap_or_default(), Qos::AtLeastOnce, false);
                                }
                            }
                        }
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    if matches!(phase, Phase::Running) {
                        // The topic and payload move on to the pipelines.
                        let ack = ack_for(&p);
                        route(app, p.topic, p.payload, &*publisher).await;
                        if let Some(ack) = ack && client.try_ack(&ack).is_err() {
                            // The broker redelivers an unacknowledged QoS 1 frame on reconnect.
                            log::debug!("could not queue PUBACK for pkid={} (request channel full)", ack.pkid);
                        }
                    } else {
                        // Not acknowledged: a persistent session redelivers it after restart.
                        deferred += 1;
                    }
                }
                Ok(Event::Incoming(Packet::ConnAck(_))) if link.poison.state == SessionReset::Clearing => {
                    // The broker has discarded the session and the frame with it. A clean session
                    // only lasts as long as its connection: leave at once (DISCONNECT, so no Last
                    // Will) and come back with a persistent one.
                    el.mqtt_options.set_clean_session(false);
                    link.poison.state = SessionReset::Disconnecting;
                    let c = client.clone();
                    tokio::spawn(async move {
                        let _ = c.disconnect().await;
                    });
                }
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    let first = !link.ever_connected;
                    if link.failures > 0 || link.ever_connected {
                        log::info!("connected to broker {target} (session_present={}, after {} failed attempt(s))", ack.session_present, link.failures);
                    } else {
                        log::info!("connected to broker {target} (session_present={})", ack.session_present);
                    }
                    if link.ever_connected {
                        app.transport.reconnects.fetch_add(1, Ordering::Relaxed);
                    }
                    link.connected = true;
                    link.ever_connected = true;
                    link.connected_at = Some(Instant::now());
                    resume(app, &mut el, &mut held, ack.session_present);
                    if let Some(spool) = app.spool.get() {
                        spool.set_connected(true);
                    }
                    link.failures = 0;
                    link.backoff = min;
                    // A resumed session still has our subscriptions, and subscribing again makes the
                    // broker resend retained frames; but on the first connection of this process
                    // the stored session may predate a config change, so subscribe then anyway.
                    if (first || !ack.session_present) && matches!(phase, Phase::Running)
                        && let Err(e) = client.try_subscribe_many(subscriptions.clone()) {
                        log::error!("cannot subscribe: {e}");
                    }
                    let _ = publisher.try_publish(&health_topic, status::online(app), Qos::AtLeastOnce, true);
                    // Staged OTA transfers: tell senders which chunks are still missing.
                    if let (Some(rx), Some(base)) = (ota.as_ref(), ota_base.as_deref()) {
                        for st in rx.pending() {
                            publish_ota(&*publisher, base, &st);
                        }
                    }
                    if link.poison.state == SessionReset::Restoring {
                        session_reset_done(app, &mut link.poison, &*publisher, &events_topic);
                    }
                    if !ready_sent {
                        ready_sent = true;
                        let _ = notifier.ready(&status::status_line(app, true));
                    } else {
                        let _ = notifier.status(&status::status_line(app, true));
                    }
                }
                Ok(Event::Incoming(Packet::SubAck(ack))) => {
                    if ack.return_codes.iter().any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure)) {
                        log::error!("broker refused a subscription ({:?}); hint: check the broker ACL for this client", ack.return_codes);
                    }
                }
                Ok(Event::Outgoing(Outgoing::Disconnect)) => {
                    if matches!(phase, Phase::Farewell { .. }) {
                        break;
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    if matches!(phase, Phase::Farewell { .. }) {
                        break;
                    }
                    held.extend(el.pending.drain(..));
                    if link.poison.state == SessionReset::Disconnecting {
                        // Our own DISCONNECT of the clean session: reconnect now, persistent.
                        link.poison.state = SessionReset::Restoring;
                        continue;
                    }
                    let lived = link.connected_at.take().map(|t| t.elapsed());
                    link.on_error(app, &e, min, max, &target);
                    // A clean session is discarded at every reconnect anyway: nothing to clear.
                    let limit = if cfg.broker.clean_session { 0 } else { cfg.broker.oversized_session_reset };
                    if link.poison.on_reset(oversized(&e), lived, limit) {
                        log::warn!(
                            "the broker redelivered a {}-byte packet above broker.max_packet_size at {} consecutive reconnects: \
                             connecting once with a clean session to drop it (whatever else the broker held for this session is discarded too); \
                             hint: set the broker's max_packet_size to {} so it refuses such frames",
                            link.poison.last_size, link.poison.streak, cfg.broker.max_packet_size
                        );
                        el.mqtt_options.set_clean_session(true);
                        link.retry_at = None;
                    }
                    if let Some(spool) = app.spool.get() {
                        spool.set_connected(false);
                    }
                    // Ready means "serving as well as the network allows": a broker that is down
                    // must not hold the unit in `activating` until systemd gives up.
                    if !ready_sent {
                        ready_sent = true;
                        let _ = notifier.ready(&status::status_line(app, false));
                    } else {
                        let _ = notifier.status(&status::status_line(app, false));
                    }
                }
            },

            _ = health.tick() => {
                if link.connected {
                    let _ = publisher.try_publish(&health_topic, status::online(app), Qos::AtLeastOnce, true);
                }
                log::debug!("{}", status::summary_line(app));
                let _ = notifier.status(&status::status_line(app, link.connected));
            }
            _ = metrics.tick(), if cfg.metrics.interval.is_some() => {
                if link.connected {
                    let _ = publisher.try_publish(&metrics_topic, status::metrics(app), Qos::AtMostOnce, false);
                }
            }

            _ = control_tick.tick() => {
                let (changed, ended) = control::step(app, &mut control_state);
                if changed {
                    let _ = notifier.status(&status::status_line(app, link.connected));
                }
                for (pipeline, report) in ended {
                    let _ = done_tx.send(reload::SwapReportFor { pipeline, report });
                }
            }

            _ = drain_check.tick(), if !matches!(phase, Phase::Running) => {
                match phase {
                    Phase::Draining { deadline } => {
                        let done = workers.iter().all(|w| w.thread.is_finished());
                        if done || Instant::now() >= deadline {
                            if !done {
                                let mut lost = 0;
                                for p in &app.pipelines {
                                    for _ in p.queue.drain_remaining() {
                                        p.stats.drop_frame(DropReason::Shutdown);
                                        lost += 1;
                                    }
                                }
                                log::warn!("shutdown grace {:?} expired: {lost} queued frame(s) dropped (counted as dropped/shutdown)", cfg.shutdown.grace);
                            }
                            if !link.connected {
                                log::warn!("broker unreachable at shutdown: offline status not published (the Last Will covers it)");
                                preserve_held(app, &mut el, &mut held);
                                break;
                            }
                            // The offline status and DISCONNECT go through the same FIFO request
                            // channel as the results, so they are written after every result.
                            let (c, payload, topic) = (client.clone(), status::offline(app, "shutdown"), health_topic.clone());
                            tokio::spawn(async move {
                                let _ = c.publish(topic, QoS::AtLeastOnce, true, payload).await;
                                let _ = c.disconnect().await;
                            });
                            phase = Phase::Farewell { deadline: Instant::now() + FAREWELL_TIMEOUT };
                        }
                    }
                    Phase::Farewell { deadline } => {
                        if Instant::now() >= deadline {
                            log::warn!("disconnect not confirmed within {FAREWELL_TIMEOUT:?}");
                            break;
                        }
                    }
                    Phase::Running => {}
                }
            }
        }
        if stop_requested {
            stops += 1;
            if stops > 1 {
                log::warn!("second stop signal: exiting without finishing the drain");
                return Err(AppError::Aborted);
            }
            let queued: usize =
                app.pipelines.iter().map(|p| p.queue.depth() + p.queue.in_flight()).sum();
            log::info!(
                "stopping: intake closed, serving {queued} queued frame(s) within {:?}",
                cfg.shutdown.grace
            );
            let _ = notifier.stopping(&format!("stopping: serving {queued} queued frame(s)"));
            for p in &app.pipelines {
                p.queue.close();
            }
            phase = Phase::Draining { deadline: Instant::now() + cfg.shutdown.grace };
        }
    }
    if deferred > 0 {
        log::info!(
            "{deferred} frame(s) arrived during shutdown and were left unacknowledged for redelivery"
        );
    }
    log::info!("stopped: {}", status::summary_line(app));
    Ok(())
}

/// The persistent session is back after a session reset: count it and say so on the events
/// topic (the frames the broker discarded with the session cannot be counted on MQTT 3.1.1:
/// the broker does not say how many it held).
fn session_reset_done(app: &App, g: &mut PoisonGuard, publisher: &dyn Publisher, events: &str) {
    app.transport.session_resets.fetch_add(1, Ordering::Relaxed);
    log::warn!(
        "session cleared and restored: the {}-byte packet is gone and serving resumes; \
         frames the broker held for the old session were discarded with it",
        g.last_size
    );
    let v = serde_json::json!({
        "event": "session_reset",
        "device": app.config.device_id,
        "reason": "oversized_packet",
        "packet_bytes": g.last_size,
        "max_packet_size": app.config.broker.max_packet_size,
        "consecutive_resets": g.streak,
        "oversized_dropped": 1,
        "discarded": "the frames the broker held for the previous session (MQTT 3.1.1 gives no count)",
    });
    let _ = publisher.try_publish(
        events,
        serde_json::to_vec(&v).unwrap_or_default(),
        Qos::AtLeastOnce,
        false,
    );
    *g = PoisonGuard::default();
}

/// A message on a topic longer than `broker.max_topic_length`: rejected (`topic_too_long`) by
/// every pipeline whose filter it matches, counted in the transport otherwise. Nothing keeps the
/// topic.
fn reject_long_topic(app: &App, topic: &str, publisher: &dyn Publisher) {
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

/// At CONNACK: gives the client back what it held when the connection failed. A resumed session
/// gets it as it was (rumqttc retransmits with the same packet ids, so the broker can recognise
/// QoS 2 repeats). A new session (broker restarted without persistence, session expired) would
/// make rumqttc drop it all; instead its QoS 1/2 publishes are sent again as new messages.
fn resume(app: &App, el: &mut EventLoop, held: &mut VecDeque<Request>, session_present: bool) {
    if held.is_empty() {
        return;
    }
    if session_present {
        held.append(&mut el.pending);
        std::mem::swap(&mut el.pending, held);
        return;
    }
    let mut n = 0u64;
    for r in held.drain(..) {
        if let Request::Publish(mut p) = r
            && p.qos != QoS::AtMostOnce
        {
            p.pkid = 0;
            p.dup = false;
            el.pending.push_back(Request::Publish(p));
            n += 1;
        }
    }
    if n > 0 {
        app.transport.republished.fetch_add(n, Ordering::Relaxed);
        log::warn!(
            "broker has no session for us (restarted without persistence?): sending {n} unacknowledged message(s) again"
        );
    }
}

/// Shutdown with the broker unreachable: results the MQTT client still holds go to the spool,
/// ahead of what it already has, instead of dying with the process.
fn preserve_held(app: &App, el: &mut EventLoop, held: &mut VecDeque<Request>) {
    let Some(spool) = app.spool.get() else {
        return;
    };
    // Requests still in the client's channel join its pending list.
    el.clean();
    held.append(&mut el.pending);
    let records: Vec<crate::spool::Record> = held
        .drain(..)
        .filter_map(|r| match r {
            Request::Publish(p) if p.qos != QoS::AtMostOnce && !p.retain => {
                Some(crate::spool::Record {
                    topic: p.topic,
                    payload: p.payload.to_vec(),
                    qos: match p.qos {
                        QoS::ExactlyOnce => Qos::ExactlyOnce,
                        _ => Qos::AtLeastOnce,
                    },
                })
            }
            _ => None,
        })
        .collect();
    let n = records.len();
    if n > 0 {
        match spool.preserve(records) {
            Ok(()) => log::info!("{n} unsent result(s) written to the spool for the next start"),
            Err(e) => {
                log::error!("cannot write {n} unsent result(s) to the spool: {e}; they are lost")
            }
        }
    }
}

/// The acknowledgement of a QoS 1/2 publish: only its qos and packet id matter, so the topic and
/// payload are not copied (they move on to whoever handles the message).
fn ack_for(p: &Publish) -> Option<Publish> {
    (p.qos != QoS::AtMostOnce).then(|| {
        let mut a = Publish::new(String::new(), p.qos, Vec::new());
        a.pkid = p.pkid;
        a
    })
}

/// What handling an OTA message needs from the serving loop.
struct OtaCtx<'a> {
    app: &'a Arc<App>,
    publisher: &'a dyn Publisher,
    base: &'a str,
    reloader: &'a reload::Reloader,
    done: &'a tokio::sync::mpsc::UnboundedSender<reload::SwapReportFor>,
    /// Where verification threads report (pipeline, outcome).
    verified: &'a tokio::sync::mpsc::UnboundedSender<(String, ota::Outcome)>,
}

/// Feeds a message on `<base>/<pipeline>/{manifest,chunk/<n>}` to the receiver, publishes the
/// status, and starts the swap of a verified delivery (its status is completed when the swap
/// reports, see `installing`).
fn handle_ota(
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
fn ota_outcome(
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
fn open_ota(app: &App) -> Option<ota::Receiver> {
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
fn publish_ota(publisher: &dyn Publisher, base: &str, st: &ota::Status) {
    let topic = format!("{base}/{}/status", st.pipeline);
    if let Ok(payload) = serde_json::to_vec(st) {
        let _ = publisher.try_publish(&topic, payload, Qos::AtLeastOnce, st.retain);
    }
}

/// Which pipelines a reload command names: an empty payload or `{}` means all of them,
/// `{"pipeline": "name"}` one.
fn reload_targets(app: &App, payload: &[u8]) -> Result<Vec<usize>, String> {
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
fn subscriptions(app: &App) -> Vec<SubscribeFilter> {
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
async fn route(app: &App, topic: String, payload: Bytes, publisher: &dyn Publisher) {
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

#[cfg(test)]
mod tests {
    use super::*;

    const S: Option<Duration> = Some(Duration::from_millis(20));

    #[test]
    fn consecutive_oversized_resets_clear_the_session_once() {
        let mut g = PoisonGuard::default();
        assert!(!g.on_reset(Some(5 << 20), S, 3));
        assert!(!g.on_reset(Some(5 << 20), S, 3));
        assert!(g.on_reset(Some(5 << 20), S, 3), "the third consecutive reset clears");
        assert_eq!((g.state, g.streak, g.last_size), (SessionReset::Clearing, 3, 5 << 20));
        assert!(!g.on_reset(Some(5 << 20), S, 3), "already clearing: not twice");
    }

    #[test]
    fn other_errors_and_long_lived_connections_break_the_streak() {
        let mut g = PoisonGuard::default();
        g.on_reset(Some(1 << 20), S, 3);
        g.on_reset(Some(1 << 20), S, 3);
        assert!(!g.on_reset(None, S, 3), "a broker restart is not the poison frame");
        assert_eq!(g.streak, 0);
        g.on_reset(Some(1 << 20), S, 3);
        g.on_reset(Some(1 << 20), S, 3);
        assert!(
            !g.on_reset(Some(1 << 20), Some(Duration::from_secs(600)), 3),
            "an oversized frame ten minutes into a connection starts a new streak"
        );
        assert_eq!(g.streak, 1);
    }

    #[test]
    fn a_limit_of_zero_never_clears() {
        let mut g = PoisonGuard::default();
        for _ in 0..50 {
            assert!(!g.on_reset(Some(1 << 20), S, 0));
        }
        assert_eq!(g.state, SessionReset::Idle);
    }
}
