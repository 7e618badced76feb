//! The serving loop's state and its handlers. `serve` (app/serve.rs) turns each source (signals,
//! the MQTT event loop, timers, reload and OTA threads) into one call here; each handler owns one
//! concern and says whether the loop goes on (`Flow`).

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use rumqttc::{
    AsyncClient, ConnAck, ConnectionError, Event, EventLoop, Outgoing, Packet, Publish, QoS,
    Request, SubAck, SubscribeFilter,
};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};
use tokio::time::Instant;

use super::delivery::{OtaCtx, handle_ota, open_ota, ota_outcome, publish_ota};
use super::link::{
    Link, PoisonGuard, SessionReset, ack_for, oversized, preserve_held, resume, session_reset_done,
};
use super::routing::{reject_long_topic, reload_targets, route, subscriptions};
use super::{App, control, reload, status};
use crate::config::Qos;
use crate::ota;
use crate::pipeline::WorkerHandle;
use crate::pipeline::swap::SwapResult;
use crate::publish::Publisher;
use crate::sys::notify::{self, Notifier};
use crate::telemetry::DropReason;

/// How long the goodbye (offline status + DISCONNECT) may take once draining is over.
const FAREWELL_TIMEOUT: Duration = Duration::from_secs(3);

/// How long the goodbye waits for the broker to answer its barrier before it disconnects anyway
/// (a broker that does not answer an UNSUBSCRIBE of a filter it does not know, as rumqttd 0.20,
/// the demo's broker, does not).
const BARRIER_TIMEOUT: Duration = Duration::from_secs(1);

/// What the serving loop does after a handler.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Flow {
    Continue,
    /// Shutdown finished (or cannot finish better): return cleanly.
    Exit,
    /// A second stop signal: return at once without finishing the drain.
    Abort,
    /// Shutdown with the broker unreachable: hand what the MQTT client holds to the spool
    /// (`preserve`, which needs the event loop), then return cleanly.
    Preserve,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Running,
    /// Intake stopped; workers finish what is queued.
    Draining {
        deadline: Instant,
    },
    /// Offline status requested, then DISCONNECT once the broker has answered everything
    /// before it; waiting for the DISCONNECT to be written.
    Farewell {
        deadline: Instant,
        /// DISCONNECT requested (the barrier's UNSUBACK came back).
        disconnecting: bool,
    },
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

/// Topics the loop publishes on or recognises, rendered once.
struct Topics {
    /// `host:port`, for log lines.
    target: String,
    health: String,
    metrics: String,
    events: String,
    reload: Option<String>,
    /// Never subscribed: unsubscribing from it is the shutdown's ordering barrier.
    farewell_barrier: String,
    /// Base of model delivery (`ota.enabled`).
    ota: Option<String>,
}

/// Where threads report back to the loop: finished swaps and verified OTA deliveries.
pub(super) struct Reports {
    pub swaps: UnboundedReceiver<reload::SwapReportFor>,
    pub verified: UnboundedReceiver<(String, ota::Outcome)>,
}

/// Hot swaps in flight and what waits on them.
struct Swaps {
    reloader: reload::Reloader,
    done: UnboundedSender<reload::SwapReportFor>,
    /// Where OTA verification threads report.
    verified: UnboundedSender<(String, ota::Outcome)>,
    /// Pipelines a SIGHUP is still reloading (READY=1 follows RELOADING=1 once all are done).
    awaiting: Vec<bool>,
}

/// Model delivery: the receiver of staged transfers and the swaps it started.
struct Delivery {
    rx: Option<ota::Receiver>,
    installing: Vec<Option<ota::Status>>,
}

/// Everything the serving loop knows between events.
pub(super) struct Serving<'a> {
    app: &'a Arc<App>,
    client: AsyncClient,
    publisher: Arc<dyn Publisher>,
    workers: &'a [WorkerHandle],
    notifier: &'a Notifier,
    topics: Topics,
    subscriptions: Vec<SubscribeFilter>,
    link: Link,
    phase: Phase,
    stops: u32,
    /// Frames that arrived while draining, left unacknowledged for redelivery.
    deferred: u64,
    /// What the MQTT client still held (unacknowledged or unsent) when the connection failed;
    /// given back to it at the next CONNACK (see `resume`).
    held: VecDeque<Request>,
    ready_sent: bool,
    watchdog: Option<Watchdog>,
    control: control::ControlState,
    swaps: Swaps,
    delivery: Delivery,
}

impl<'a> Serving<'a> {
    pub(super) fn new(
        app: &'a Arc<App>,
        client: AsyncClient,
        publisher: Arc<dyn Publisher>,
        workers: &'a [WorkerHandle],
        notifier: &'a Notifier,
    ) -> (Self, Reports) {
        let cfg = &app.config;
        let topics = Topics {
            target: format!("{}:{}", cfg.broker.host, cfg.broker.port),
            health: cfg.health.topic.render(&cfg.device_id, ""),
            metrics: cfg.metrics.topic.render(&cfg.device_id, ""),
            events: cfg.commands.events_topic.render(&cfg.device_id, ""),
            reload: cfg.commands.reload_topic.as_ref().map(|t| t.render(&cfg.device_id, "")),
            farewell_barrier: format!("{}/farewell", cfg.health.topic.render(&cfg.device_id, "")),
            ota: cfg.ota.enabled.then(|| cfg.ota.topic.render(&cfg.device_id, "")),
        };
        let period = if notifier.enabled() { notify::watchdog_period() } else { None };
        let watchdog = period.map(|period| {
            log::info!(
                "systemd watchdog every {period:?}: pinging while every worker makes progress"
            );
            Watchdog {
                period,
                last: workers
                    .iter()
                    .map(|w| (w.progress.load(Ordering::Relaxed), Instant::now()))
                    .collect(),
                stalled: false,
            }
        });
        let (done, swaps_rx) = unbounded_channel();
        let (verified, verified_rx) = unbounded_channel();
        // Staged OTA transfers resume across restarts.
        let rx = topics.ota.as_ref().and_then(|_| open_ota(app));
        let (min, n) = (cfg.broker.reconnect_min, app.pipelines.len());
        let serving = Serving {
            app,
            client,
            publisher,
            workers,
            notifier,
            subscriptions: subscriptions(app),
            topics,
            link: Link {
                connected: false,
                ever_connected: false,
                failures: 0,
                backoff: min,
                retry_at: None,
                connected_at: None,
                poison: PoisonGuard::default(),
            },
            phase: Phase::Running,
            stops: 0,
            deferred: 0,
            held: VecDeque::new(),
            ready_sent: false,
            watchdog,
            control: control::ControlState::new(app),
            swaps: Swaps {
                reloader: reload::Reloader::new(app),
                done,
                verified,
                awaiting: vec![false; n],
            },
            delivery: Delivery { rx, installing: vec![None; n] },
        };
        (serving, Reports { swaps: swaps_rx, verified: verified_rx })
    }

    // --- What the select arms need to know -------------------------------------------------

    /// The systemd watchdog period, when systemd asked for pings.
    pub(super) fn watchdog_period(&self) -> Option<Duration> {
        self.watchdog.as_ref().map(|w| w.period)
    }

    /// Watchdog pings start once READY=1 is out.
    pub(super) fn pings_due(&self) -> bool {
        self.watchdog.is_some() && self.ready_sent
    }

    /// When the next connection attempt may start (backoff), if the loop is waiting for one.
    pub(super) fn retry_at(&self) -> Option<Instant> {
        self.link.retry_at
    }

    pub(super) fn draining(&self) -> bool {
        self.phase != Phase::Running
    }

    fn running(&self) -> bool {
        self.phase == Phase::Running
    }

    // --- Signals and commands ------------------------------------------------------------------

    /// SIGTERM, SIGINT or a stop request: the first closes intake and starts the drain, a second
    /// aborts it.
    pub(super) fn on_stop(&mut self) -> Flow {
        self.stops += 1;
        if self.stops > 1 {
            log::warn!("second stop signal: exiting without finishing the drain");
            return Flow::Abort;
        }
        let app = self.app;
        let queued: usize =
            app.pipelines.iter().map(|p| p.queue.depth() + p.queue.in_flight()).sum();
        log::info!(
            "stopping: intake closed, serving {queued} queued frame(s) within {:?}",
            app.config.shutdown.grace
        );
        let _ = self.notifier.stopping(&format!("stopping: serving {queued} queued frame(s)"));
        for p in &app.pipelines {
            p.queue.close();
        }
        self.phase = Phase::Draining { deadline: Instant::now() + app.config.shutdown.grace };
        Flow::Continue
    }

    /// SIGHUP (`systemctl reload`): reload every model file; READY=1 once all swaps reported.
    pub(super) fn on_sighup(&mut self) -> Flow {
        let _ = self.notifier.reloading();
        log::info!("SIGHUP: reloading model files (configuration changes need a restart)");
        for (i, waiting) in self.swaps.awaiting.iter_mut().enumerate() {
            *waiting = true;
            self.swaps.reloader.start(self.app, i, "sighup", self.swaps.done.clone());
        }
        if self.app.pipelines.is_empty() {
            let _ = self.notifier.ready(&status::status_line(self.app, self.link.connected));
        }
        Flow::Continue
    }

    /// The watched model file of pipeline `idx` changed.
    pub(super) fn on_file_change(&mut self, idx: usize) -> Flow {
        self.swaps.reloader.start(self.app, idx, "file", self.swaps.done.clone());
        Flow::Continue
    }

    /// The reload command (`commands.reload_topic`): which pipelines, or why not.
    fn on_reload_command(&mut self, payload: &[u8]) {
        match reload_targets(self.app, payload) {
            Ok(targets) => {
                log::info!("reload command for {} pipeline(s)", targets.len());
                for i in targets {
                    self.swaps.reloader.start(self.app, i, "command", self.swaps.done.clone());
                }
            }
            Err(e) => {
                log::warn!("reload command refused: {e}");
                if self.link.connected {
                    let v = serde_json::json!({"event": "command_error", "device": self.app.config.device_id, "command": "reload", "reason": e});
                    self.event(&v);
                }
            }
        }
    }

    // --- Model swaps and deliveries ------------------------------------------------------------

    /// A swap finished (reload thread or probation end): events message, health, the OTA status
    /// of a delivery it installed, READY=1 after a SIGHUP once every pipeline reported.
    pub(super) fn on_swap_report(&mut self, done: reload::SwapReportFor) -> Flow {
        let app = self.app;
        if let Some(p) = app.pipelines.get(done.pipeline) {
            let mut v = serde_json::to_value(&done.report).unwrap_or_default();
            if let serde_json::Value::Object(o) = &mut v {
                let event = match done.report.result {
                    SwapResult::Kept | SwapResult::RolledBack => "model_probation",
                    _ => "model_swap",
                };
                o.insert("event".into(), event.into());
                o.insert("pipeline".into(), p.name().into());
                o.insert("device".into(), app.config.device_id.clone().into());
            }
            if self.link.connected {
                self.event(&v);
                self.health();
            }
        }
        if done.report.trigger == "ota"
            && let Some(mut st) =
                self.delivery.installing.get_mut(done.pipeline).and_then(Option::take)
        {
            st.state = match done.report.result {
                SwapResult::Swapped | SwapResult::Unchanged => "installed",
                _ => "rejected",
            };
            st.reason = done.report.reason.clone();
            st.missing.clear();
            if let Some(base) = self.topics.ota.as_deref() {
                publish_ota(&*self.publisher, base, &st);
            }
        }
        let awaiting = &mut self.swaps.awaiting;
        let was_waiting = awaiting.iter().any(|w| *w);
        let probation = matches!(done.report.result, SwapResult::Kept | SwapResult::RolledBack);
        if !probation && let Some(w) = awaiting.get_mut(done.pipeline) {
            *w = false;
        }
        if was_waiting && !awaiting.iter().any(|w| *w) {
            let _ = self.notifier.ready(&status::status_line(app, self.link.connected));
        }
        Flow::Continue
    }

    /// An OTA message (`<ota.topic>/<pipeline>/{manifest,chunk/<n>}`), while running.
    fn on_ota_message(&mut self, topic: &str, payload: &[u8]) {
        self.with_ota(|ctx, d| {
            if let Some(rx) = d.rx.as_mut() {
                handle_ota(ctx, rx, topic, payload, &mut d.installing);
            }
        });
    }

    /// A verification thread finished with a delivered file.
    pub(super) fn on_verified(&mut self, pipeline: &str, outcome: ota::Outcome) -> Flow {
        self.with_ota(|ctx, d| ota_outcome(ctx, pipeline, outcome, &mut d.installing));
        Flow::Continue
    }

    /// Runs `f` with what OTA handling needs from the loop, when model delivery is on.
    fn with_ota(&mut self, f: impl FnOnce(&OtaCtx<'_>, &mut Delivery)) {
        let Some(base) = self.topics.ota.as_deref() else {
            return;
        };
        let ctx = OtaCtx {
            app: self.app,
            publisher: &*self.publisher,
            base,
            reloader: &self.swaps.reloader,
            done: &self.swaps.done,
            verified: &self.swaps.verified,
        };
        f(&ctx, &mut self.delivery);
    }

    // --- The broker connection -----------------------------------------------------------------

    /// One event of the MQTT client.
    pub(super) async fn on_event(
        &mut self,
        el: &mut EventLoop,
        ev: Result<Event, ConnectionError>,
    ) -> Flow {
        match ev {
            Ok(Event::Incoming(Packet::Publish(p))) => self.on_publish(p).await,
            Ok(Event::Incoming(Packet::ConnAck(ack))) => self.on_connack(el, &ack),
            Ok(Event::Incoming(Packet::SubAck(ack))) => on_suback(&ack),
            Ok(Event::Incoming(Packet::UnsubAck(_))) => self.on_farewell_barrier(),
            Ok(Event::Outgoing(Outgoing::Disconnect))
                if matches!(self.phase, Phase::Farewell { .. }) =>
            {
                Flow::Exit
            }
            Ok(_) => Flow::Continue,
            Err(e) => self.on_link_error(el, &e),
        }
    }

    /// A message from the broker: an over-long topic, an OTA message or the reload command (each
    /// acknowledged and handled here), or a frame for the pipelines.
    pub(super) async fn on_publish(&mut self, p: Publish) -> Flow {
        let is_ota = self
            .topics
            .ota
            .as_deref()
            .is_some_and(|b| p.topic.strip_prefix(b).is_some_and(|r| r.starts_with('/')));
        if p.topic.len() > self.app.config.broker.max_topic_length {
            // Before anything reads the topic: never routed, never remembered per device.
            self.ack(&p);
            reject_long_topic(self.app, &p.topic, &*self.publisher);
        } else if is_ota {
            self.ack(&p);
            if self.running() {
                self.on_ota_message(&p.topic, &p.payload);
            }
        } else if self.topics.reload.as_deref() == Some(p.topic.as_str()) {
            // A command, not a frame: acknowledge and act (only while running).
            self.ack(&p);
            if self.running() {
                self.on_reload_command(&p.payload);
            }
        } else if self.running() {
            // The topic and payload move on to the pipelines.
            let ack = ack_for(&p);
            route(self.app, p.topic, p.payload, &*self.publisher).await;
            if let Some(ack) = ack
                && self.client.try_ack(&ack).is_err()
            {
                // The broker redelivers an unacknowledged QoS 1 frame on reconnect.
                log::debug!("could not queue PUBACK for pkid={} (request channel full)", ack.pkid);
            }
        } else {
            // Not acknowledged: a persistent session redelivers it after restart.
            self.deferred += 1;
        }
        Flow::Continue
    }

    fn ack(&self, p: &Publish) {
        if let Some(a) = ack_for(p) {
            let _ = self.client.try_ack(&a);
        }
    }

    /// Connected: resume what the client held, subscribe, publish health and staged OTA
    /// transfers, finish a session reset, tell systemd.
    pub(super) fn on_connack(&mut self, el: &mut EventLoop, ack: &ConnAck) -> Flow {
        if self.link.poison.state == SessionReset::Clearing {
            // The broker has discarded the session and the frame with it. A clean session only
            // lasts as long as its connection: leave at once (DISCONNECT, so no Last Will) and
            // come back with a persistent one.
            el.mqtt_options.set_clean_session(false);
            self.link.poison.state = SessionReset::Disconnecting;
            let c = self.client.clone();
            tokio::spawn(async move {
                let _ = c.disconnect().await;
            });
            return Flow::Continue;
        }
        let (app, link) = (self.app, &mut self.link);
        let first = !link.ever_connected;
        let target = &self.topics.target;
        if link.failures > 0 || link.ever_connected {
            log::info!(
                "connected to broker {target} (session_present={}, after {} failed attempt(s))",
                ack.session_present,
                link.failures
            );
        } else {
            log::info!("connected to broker {target} (session_present={})", ack.session_present);
        }
        if link.ever_connected {
            app.transport.reconnects.fetch_add(1, Ordering::Relaxed);
        }
        link.connected = true;
        link.ever_connected = true;
        link.connected_at = Some(Instant::now());
        resume(app, el, &mut self.held, ack.session_present);
        if let Some(spool) = app.spool.get() {
            spool.set_connected(true);
        }
        link.failures = 0;
        link.backoff = app.config.broker.reconnect_min;
        // A resumed session still has our subscriptions, and subscribing again makes the broker
        // resend retained frames; but on the first connection of this process the stored
        // session may predate a config change, so subscribe then anyway.
        if (first || !ack.session_present)
            && self.running()
            && let Err(e) = self.client.try_subscribe_many(self.subscriptions.clone())
        {
            log::error!("cannot subscribe: {e}");
        }
        self.health();
        // Staged OTA transfers: tell senders which chunks are still missing.
        if let (Some(rx), Some(base)) = (self.delivery.rx.as_ref(), self.topics.ota.as_deref()) {
            for st in rx.pending() {
                publish_ota(&*self.publisher, base, &st);
            }
        }
        if self.link.poison.state == SessionReset::Restoring {
            session_reset_done(app, &mut self.link.poison, &*self.publisher, &self.topics.events);
        }
        self.tell_systemd(true);
        Flow::Continue
    }

    /// The connection failed or could not be made: keep what the client held, back off, and
    /// clear the session once if an oversized packet keeps coming back.
    pub(super) fn on_link_error(&mut self, el: &mut EventLoop, e: &ConnectionError) -> Flow {
        if matches!(self.phase, Phase::Farewell { .. }) {
            return Flow::Exit;
        }
        self.held.extend(el.pending.drain(..));
        let (app, cfg) = (self.app, &self.app.config);
        if self.link.poison.state == SessionReset::Disconnecting {
            // Our own DISCONNECT of the clean session: reconnect now, persistent.
            self.link.poison.state = SessionReset::Restoring;
            return Flow::Continue;
        }
        let lived = self.link.connected_at.take().map(|t| t.elapsed());
        self.link.on_error(app, e, &self.topics.target);
        // A clean session is discarded at every reconnect anyway: nothing to clear.
        let limit = if cfg.broker.clean_session { 0 } else { cfg.broker.oversized_session_reset };
        let poison = &mut self.link.poison;
        if poison.on_reset(oversized(e), lived, limit) {
            log::warn!(
                "the broker redelivered a {}-byte packet above broker.max_packet_size at {} consecutive reconnects: \
                 connecting once with a clean session to drop it (whatever else the broker held for this session is discarded too); \
                 hint: set the broker's max_packet_size to {} so it refuses such frames",
                poison.last_size,
                poison.streak,
                cfg.broker.max_packet_size
            );
            el.mqtt_options.set_clean_session(true);
            self.link.retry_at = None;
        }
        if let Some(spool) = app.spool.get() {
            spool.set_connected(false);
        }
        // Ready means "serving as well as the network allows": a broker that is down must not
        // hold the unit in `activating` until systemd gives up.
        self.tell_systemd(false);
        Flow::Continue
    }

    /// The backoff before the next connection attempt is over.
    pub(super) fn on_retry_due(&mut self) -> Flow {
        self.link.retry_at = None;
        Flow::Continue
    }

    /// READY=1 the first time the link settles (connected or not), STATUS= afterwards.
    fn tell_systemd(&mut self, connected: bool) {
        let line = status::status_line(self.app, connected);
        if !self.ready_sent {
            self.ready_sent = true;
            let _ = self.notifier.ready(&line);
        } else {
            let _ = self.notifier.status(&line);
        }
    }

    // --- Timers --------------------------------------------------------------------------------

    pub(super) fn on_health_tick(&mut self) -> Flow {
        if self.link.connected {
            self.health();
        }
        log::debug!("{}", status::summary_line(self.app));
        let _ = self.notifier.status(&status::status_line(self.app, self.link.connected));
        Flow::Continue
    }

    pub(super) fn on_metrics_tick(&mut self) -> Flow {
        if self.link.connected {
            let payload = status::metrics(self.app);
            let _ =
                self.publisher.try_publish(&self.topics.metrics, payload, Qos::AtMostOnce, false);
        }
        Flow::Continue
    }

    /// Overload control and probation: one step; probations that ended report like swaps.
    pub(super) fn on_control_tick(&mut self) -> Flow {
        let (changed, ended) = control::step(self.app, &mut self.control);
        if changed {
            let _ = self.notifier.status(&status::status_line(self.app, self.link.connected));
        }
        for (pipeline, report) in ended {
            let _ = self.swaps.done.send(reload::SwapReportFor { pipeline, report });
        }
        Flow::Continue
    }

    pub(super) fn on_watchdog_tick(&mut self) -> Flow {
        if let Some(w) = self.watchdog.as_mut()
            && w.all_alive(self.workers)
        {
            let _ = self.notifier.watchdog();
        }
        Flow::Continue
    }

    /// While stopping: once the workers are done (or the grace period is over) say goodbye;
    /// once the goodbye is written (or takes too long) exit.
    pub(super) fn drain_tick(&mut self) -> Flow {
        match self.phase {
            Phase::Running => Flow::Continue,
            Phase::Farewell { deadline, disconnecting, .. } => {
                let now = Instant::now();
                if now >= deadline {
                    log::warn!("disconnect not confirmed within {FAREWELL_TIMEOUT:?}");
                    return Flow::Exit;
                }
                if !disconnecting && now + FAREWELL_TIMEOUT >= deadline + BARRIER_TIMEOUT {
                    log::debug!(
                        "the broker did not answer the goodbye's barrier within {BARRIER_TIMEOUT:?}: disconnecting anyway"
                    );
                    return self.on_farewell_barrier();
                }
                Flow::Continue
            }
            Phase::Draining { deadline } => {
                let done = self.workers.iter().all(|w| w.thread.is_finished());
                if !done && Instant::now() < deadline {
                    return Flow::Continue;
                }
                if !done {
                    self.drop_queued();
                }
                if !self.link.connected {
                    log::warn!(
                        "broker unreachable at shutdown: offline status not published (the Last Will covers it)"
                    );
                    return Flow::Preserve;
                }
                // The offline status goes through the same FIFO request channel as the results,
                // so it is written after every result. Then a barrier: an UNSUBSCRIBE of a
                // filter never subscribed, which the broker answers in order, after the PUBACKs
                // of everything before it. Only then DISCONNECT (`on_farewell_barrier`): a client
                // that closes its socket before the broker has sent a PUBACK makes mosquitto
                // (before 2.0.22) drop the connection as an error and publish the Last Will,
                // `connection_lost`, over the offline status.
                let (c, payload, topic, barrier) = (
                    self.client.clone(),
                    status::offline(self.app, "shutdown"),
                    self.topics.health.clone(),
                    self.topics.farewell_barrier.clone(),
                );
                tokio::spawn(async move {
                    let _ = c.publish(topic, QoS::AtLeastOnce, true, payload).await;
                    let _ = c.unsubscribe(barrier).await;
                });
                self.phase = Phase::Farewell {
                    deadline: Instant::now() + FAREWELL_TIMEOUT,
                    disconnecting: false,
                };
                Flow::Continue
            }
        }
    }

    /// The broker answered the farewell barrier: everything before it is acknowledged, so the
    /// DISCONNECT can go (and the process exit once it is written).
    fn on_farewell_barrier(&mut self) -> Flow {
        if let Phase::Farewell { disconnecting: d @ false, .. } = &mut self.phase {
            *d = true;
            let c = self.client.clone();
            tokio::spawn(async move {
                let _ = c.disconnect().await;
            });
        }
        Flow::Continue
    }

    /// Shutdown with the broker unreachable: what the client still holds goes to the spool.
    pub(super) fn preserve(&mut self, el: &mut EventLoop) {
        preserve_held(self.app, el, &mut self.held);
    }

    /// The grace period expired with frames still queued: they are dropped and counted.
    fn drop_queued(&self) {
        let mut lost = 0;
        for p in &self.app.pipelines {
            for _ in p.queue.drain_remaining() {
                p.stats.drop_frame(DropReason::Shutdown);
                lost += 1;
            }
        }
        log::warn!(
            "shutdown grace {:?} expired: {lost} queued frame(s) dropped (counted as dropped/shutdown)",
            self.app.config.shutdown.grace
        );
    }

    /// The loop has returned cleanly.
    pub(super) fn finish(self) {
        if self.deferred > 0 {
            log::info!(
                "{} frame(s) arrived during shutdown and were left unacknowledged for redelivery",
                self.deferred
            );
        }
        log::info!("stopped: {}", status::summary_line(self.app));
    }

    // --- Publishing ----------------------------------------------------------------------------

    /// The retained health message (online).
    fn health(&self) {
        let payload = status::online(self.app);
        let _ = self.publisher.try_publish(&self.topics.health, payload, Qos::AtLeastOnce, true);
    }

    /// A message on the events topic.
    fn event(&self, v: &serde_json::Value) {
        let payload = serde_json::to_vec(v).unwrap_or_default();
        let _ = self.publisher.try_publish(&self.topics.events, payload, Qos::AtLeastOnce, false);
    }
}

fn on_suback(ack: &SubAck) -> Flow {
    if ack.return_codes.iter().any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure)) {
        log::error!(
            "broker refused a subscription ({:?}); hint: check the broker ACL for this client",
            ack.return_codes
        );
    }
    Flow::Continue
}

#[cfg(test)]
mod tests {
    //! Handlers on a real App (the `digits` fixture model, no workers) with the recording
    //! publisher; the MQTT client is real but never connected: what it was asked to send is read
    //! back from its request queue.

    use std::path::Path;

    use rumqttc::{ConnectReturnCode, MqttOptions, StateError};

    use super::*;
    use crate::config::Config;
    use crate::pipeline::recorder::{Recorder, Sent};

    struct Rig {
        app: Arc<App>,
        rec: Arc<Recorder>,
        client: AsyncClient,
        el: EventLoop,
        notifier: Notifier,
    }

    fn rig(extra: &str) -> Rig {
        let model = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/models/digits/model.onnx");
        let text = format!(
            "device_id = \"edge-1\"\n{extra}\n[pipelines.digits]\nmodel = {:?}\ninput = \"sensors/+/digits\"\n",
            model.display()
        );
        let cfg = Config::parse_str(&text, "test.toml", None).expect("config");
        let (client, el) = AsyncClient::new(MqttOptions::new("t", "127.0.0.1", 1), 64);
        Rig {
            app: App::for_tests(cfg),
            rec: Arc::new(Recorder::default()),
            client,
            el,
            notifier: Notifier::disabled(),
        }
    }

    impl Rig {
        fn serving(&self) -> Serving<'_> {
            Serving::new(&self.app, self.client.clone(), self.rec.clone(), &[], &self.notifier).0
        }

        /// What the handlers asked the MQTT client to send (acknowledgements excepted).
        fn requests(&mut self) -> Vec<Request> {
            requests(&mut self.el)
        }
    }

    /// What was asked of the client whose event loop this is (acknowledgements excepted).
    fn requests(el: &mut EventLoop) -> Vec<Request> {
        el.clean();
        el.pending.drain(..).collect()
    }

    fn connack(session_present: bool) -> ConnAck {
        ConnAck { session_present, code: ConnectReturnCode::Success }
    }

    fn publish(topic: &str, payload: &str, pkid: u16) -> Publish {
        let mut p = Publish::new(topic, QoS::AtLeastOnce, payload.as_bytes().to_vec());
        p.pkid = pkid;
        p
    }

    fn lost() -> ConnectionError {
        ConnectionError::Io(std::io::Error::other("connection reset (fault injection)"))
    }

    fn oversized_packet() -> ConnectionError {
        ConnectionError::MqttState(StateError::Deserialization(
            rumqttc::Error::PayloadSizeLimitExceeded(5 << 20),
        ))
    }

    fn on_topic<'s>(sent: &'s [Sent], topic: &str) -> Vec<&'s Sent> {
        sent.iter().filter(|s| s.topic == topic).collect()
    }

    #[test]
    fn the_first_connack_subscribes_and_publishes_retained_health() {
        let mut r = rig("[commands]\nreload_topic = \"edgeinfer/{device}/cmd/reload\"\n");
        let mut s = r.serving();
        let mut el = AsyncClient::new(MqttOptions::new("x", "h", 1), 8).1;
        assert_eq!(s.on_connack(&mut el, &connack(true)), Flow::Continue);
        assert!(s.link.connected && s.ready_sent);
        drop(s);
        let subs: Vec<String> = r
            .requests()
            .into_iter()
            .filter_map(|q| match q {
                Request::Subscribe(s) => Some(s.filters.into_iter().map(|f| f.path)),
                _ => None,
            })
            .flatten()
            .collect();
        // Even with a stored session: it may predate a config change.
        assert_eq!(subs, ["edgeinfer/edge-1/cmd/reload", "sensors/+/digits"]);
        let sent = r.rec.take_sent();
        let health = on_topic(&sent, "edgeinfer/edge-1/health");
        assert_eq!(health.len(), 1, "{sent:?}");
        assert!(health[0].retain);
        assert_eq!(health[0].json()["status"], "online");
    }

    #[test]
    fn a_new_session_gets_held_results_again_as_new_messages_and_a_resumed_one_as_they_were() {
        for session_present in [false, true] {
            let r = rig("");
            let mut s = r.serving();
            let mut el = AsyncClient::new(MqttOptions::new("x", "h", 1), 8).1;
            s.on_connack(&mut el, &connack(false));
            // The connection fails with a result unacknowledged and a QoS 0 message unsent.
            let mut unacked = publish("out/a", "{}", 7);
            unacked.dup = true;
            el.pending.push_back(Request::Publish(unacked));
            el.pending.push_back(Request::Publish(Publish::new("m", QoS::AtMostOnce, vec![])));
            assert_eq!(s.on_link_error(&mut el, &lost()), Flow::Continue);
            assert!(!s.link.connected && s.retry_at().is_some());
            assert_eq!(s.held.len(), 2);
            s.on_connack(&mut el, &connack(session_present));
            let again: Vec<(u16, bool, QoS)> = el
                .pending
                .iter()
                .filter_map(|q| match q {
                    Request::Publish(p) => Some((p.pkid, p.dup, p.qos)),
                    _ => None,
                })
                .collect();
            let republished = r.app.transport.republished.load(Ordering::Relaxed);
            if session_present {
                // Same packet ids: the broker recognises repeats.
                assert_eq!(again, [(7, true, QoS::AtLeastOnce), (0, false, QoS::AtMostOnce)]);
                assert_eq!(republished, 0);
            } else {
                // rumqttc would drop them on a new session: sent again as new QoS 1 messages.
                assert_eq!(again, [(0, false, QoS::AtLeastOnce)]);
                assert_eq!(republished, 1);
            }
            assert_eq!(r.app.transport.reconnects.load(Ordering::Relaxed), 1);
            assert!(s.held.is_empty());
        }
    }

    #[test]
    fn backoff_doubles_up_to_the_limit_and_ready_is_sent_with_the_broker_down() {
        let r = rig("[broker]\nreconnect_min = \"100ms\"\nreconnect_max = \"300ms\"\n");
        let mut s = r.serving();
        let mut el = AsyncClient::new(MqttOptions::new("x", "h", 1), 8).1;
        let mut waits = Vec::new();
        for _ in 0..4 {
            let before = Instant::now();
            s.on_link_error(&mut el, &lost());
            waits.push(s.retry_at().expect("backoff") - before);
            assert_eq!(s.on_retry_due(), Flow::Continue);
            assert_eq!(s.retry_at(), None);
        }
        let ms: Vec<u128> = waits.iter().map(|d| (d.as_millis() + 5) / 10 * 10).collect();
        assert_eq!(ms, [100, 200, 300, 300]);
        assert!(s.ready_sent, "READY=1 must not wait for a broker that is down");
        assert_eq!(r.app.transport.connection_errors.load(Ordering::Relaxed), 4);
    }

    #[tokio::test]
    async fn an_oversized_packet_at_consecutive_reconnects_clears_the_session_once() {
        let r = rig("");
        let mut s = r.serving();
        let mut el = AsyncClient::new(MqttOptions::new("x", "h", 1), 8).1;
        el.mqtt_options.set_clean_session(false);
        for _ in 0..2 {
            s.on_connack(&mut el, &connack(true));
            s.on_link_error(&mut el, &oversized_packet());
            assert!(!el.mqtt_options.clean_session());
        }
        s.on_connack(&mut el, &connack(true));
        s.on_link_error(&mut el, &oversized_packet());
        assert!(el.mqtt_options.clean_session(), "the third reset connects with a clean session");
        assert_eq!(s.retry_at(), None, "at once");
        assert_eq!(r.app.transport.oversized_packets.load(Ordering::Relaxed), 3);
        // Clean session acknowledged: leave it at once and come back persistent.
        r.rec.take_sent();
        s.on_connack(&mut el, &connack(false));
        assert!(!el.mqtt_options.clean_session());
        assert_eq!(s.link.poison.state, SessionReset::Disconnecting);
        assert!(r.rec.take_sent().is_empty(), "nothing published on the throw-away session");
        // Our own DISCONNECT ends that connection: no backoff, no error counted as a failure.
        s.on_link_error(&mut el, &ConnectionError::RequestsDone);
        assert_eq!((s.link.poison.state, s.retry_at()), (SessionReset::Restoring, None));
        s.on_connack(&mut el, &connack(false));
        let sent = r.rec.take_sent();
        let events = on_topic(&sent, "edgeinfer/edge-1/events");
        assert_eq!(events.len(), 1, "{sent:?}");
        let v = events[0].json();
        assert_eq!(
            (v["event"].as_str(), v["packet_bytes"].as_u64()),
            (Some("session_reset"), Some(5 << 20))
        );
        assert_eq!(r.app.transport.session_resets.load(Ordering::Relaxed), 1);
        assert_eq!(s.link.poison.state, SessionReset::Idle);
    }

    #[tokio::test]
    async fn frames_are_routed_and_an_over_long_topic_is_rejected_without_routing() {
        let r = rig("[broker]\nmax_topic_length = 128\n");
        let mut s = r.serving();
        let frame = serde_json::json!({"data": vec![0.0f32; 64]}).to_string();
        s.on_publish(publish("sensors/a/digits", &frame, 1)).await;
        s.on_publish(publish("sensors/b/other", &frame, 2)).await;
        let p = &r.app.pipelines[0];
        assert_eq!(p.queue.depth(), 1, "the matching frame is queued for the workers");
        assert_eq!(r.app.transport.unrouted.load(Ordering::Relaxed), 1);
        let long = format!("sensors/{}/digits", "x".repeat(200));
        s.on_publish(publish(&long, &frame, 3)).await;
        assert_eq!(p.queue.depth(), 1, "not routed");
        assert_eq!(r.app.transport.long_topics.load(Ordering::Relaxed), 1);
        let sent = r.rec.take_sent();
        assert_eq!(sent.len(), 1, "{sent:?}");
        let v = sent[0].json();
        assert_eq!(v["reason"], "topic_too_long");
        assert!(
            v["topic"].as_str().is_some_and(|t| t.len() < long.len()),
            "the topic is shortened: {v}"
        );
    }

    #[tokio::test]
    async fn a_reload_command_naming_no_pipeline_is_answered_on_the_events_topic() {
        let r = rig("[commands]\nreload_topic = \"edgeinfer/{device}/cmd/reload\"\n");
        let mut s = r.serving();
        let mut el = AsyncClient::new(MqttOptions::new("x", "h", 1), 8).1;
        s.on_connack(&mut el, &connack(false));
        r.rec.take_sent();
        s.on_publish(publish("edgeinfer/edge-1/cmd/reload", r#"{"pipeline": "nope"}"#, 4)).await;
        let sent = r.rec.take_sent();
        assert_eq!(sent.len(), 1, "{sent:?}");
        assert_eq!(sent[0].topic, "edgeinfer/edge-1/events");
        let v = sent[0].json();
        assert_eq!(v["event"], "command_error");
        assert!(
            v["reason"].as_str().is_some_and(|e| e.contains("no pipeline named \"nope\"")),
            "{v}"
        );
        // A command is never a frame.
        assert_eq!(r.app.pipelines[0].queue.depth(), 0);
    }

    #[tokio::test]
    async fn stopping_defers_new_frames_and_a_second_stop_aborts() {
        let r = rig("");
        let mut s = r.serving();
        assert_eq!(s.on_stop(), Flow::Continue);
        assert!(s.draining());
        let frame = serde_json::json!({"data": vec![0.0f32; 64]}).to_string();
        s.on_publish(publish("sensors/a/digits", &frame, 9)).await;
        assert_eq!((s.deferred, r.app.pipelines[0].queue.depth()), (1, 0));
        assert_eq!(s.on_stop(), Flow::Abort);
    }

    #[tokio::test]
    async fn the_drain_says_goodbye_when_connected_and_exits_at_once_when_not() {
        // Broker down: nothing to say goodbye to (the Last Will covers it).
        let mut r = rig("");
        let mut el = AsyncClient::new(MqttOptions::new("x", "h", 1), 8).1;
        let mut s = Serving::new(&r.app, r.client.clone(), r.rec.clone(), &[], &r.notifier).0;
        s.on_stop();
        assert_eq!(s.drain_tick(), Flow::Preserve);
        // Connected: the offline status, then the barrier; DISCONNECT only once the broker has
        // answered the barrier (so every PUBACK before it was sent); exit once it is written.
        let mut s = Serving::new(&r.app, r.client.clone(), r.rec.clone(), &[], &r.notifier).0;
        s.on_connack(&mut el, &connack(false));
        requests(&mut r.el);
        s.on_stop();
        assert_eq!(s.drain_tick(), Flow::Continue);
        assert!(matches!(s.phase, Phase::Farewell { disconnecting: false, .. }));
        tokio::time::sleep(Duration::from_millis(20)).await;
        let sent = requests(&mut r.el);
        assert_eq!(sent.len(), 2, "{sent:?}");
        match &sent[0] {
            Request::Publish(p) => {
                assert!(p.retain && p.topic == "edgeinfer/edge-1/health", "{p:?}");
                let v: serde_json::Value = serde_json::from_slice(&p.payload).expect("json");
                assert_eq!(
                    (v["status"].as_str(), v["reason"].as_str()),
                    (Some("offline"), Some("shutdown"))
                );
            }
            other => panic!("expected the offline status first, got {other:?}"),
        }
        assert!(
            matches!(&sent[1], Request::Unsubscribe(u) if u.topics == ["edgeinfer/edge-1/health/farewell"]),
            "{sent:?}"
        );
        assert_eq!(
            s.on_event(&mut el, Ok(Event::Outgoing(Outgoing::PingReq))).await,
            Flow::Continue
        );
        let unsuback = rumqttc::UnsubAck { pkid: 1 };
        assert_eq!(
            s.on_event(&mut el, Ok(Event::Incoming(Packet::UnsubAck(unsuback)))).await,
            Flow::Continue
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(matches!(requests(&mut r.el)[..], [Request::Disconnect(_)]));
        assert_eq!(
            s.on_event(&mut el, Ok(Event::Outgoing(Outgoing::Disconnect))).await,
            Flow::Exit
        );
    }

    #[tokio::test]
    async fn a_broker_that_never_answers_the_barrier_still_gets_a_disconnect() {
        let mut r = rig("");
        let mut el = AsyncClient::new(MqttOptions::new("x", "h", 1), 8).1;
        let mut s = Serving::new(&r.app, r.client.clone(), r.rec.clone(), &[], &r.notifier).0;
        s.on_connack(&mut el, &connack(false));
        s.on_stop();
        assert_eq!(s.drain_tick(), Flow::Continue);
        tokio::time::sleep(Duration::from_millis(20)).await;
        requests(&mut r.el);
        // No UNSUBACK (rumqttd does not answer unknown filters): nothing before the barrier
        // timeout, DISCONNECT after it, and the loop still waits for it to be written.
        assert_eq!(s.drain_tick(), Flow::Continue);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(requests(&mut r.el).is_empty());
        tokio::time::sleep(BARRIER_TIMEOUT).await;
        assert_eq!(s.drain_tick(), Flow::Continue);
        assert!(matches!(s.phase, Phase::Farewell { disconnecting: true, .. }));
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(matches!(requests(&mut r.el)[..], [Request::Disconnect(_)]));
    }

    #[test]
    fn health_and_metrics_go_out_only_while_connected() {
        let r = rig("[metrics]\ninterval = \"10s\"\n");
        let mut s = r.serving();
        s.on_health_tick();
        s.on_metrics_tick();
        assert!(r.rec.take_sent().is_empty());
        let mut el = AsyncClient::new(MqttOptions::new("x", "h", 1), 8).1;
        s.on_connack(&mut el, &connack(false));
        r.rec.take_sent();
        s.on_health_tick();
        s.on_metrics_tick();
        let sent = r.rec.take_sent();
        let topics: Vec<(&str, bool)> = sent.iter().map(|s| (s.topic.as_str(), s.retain)).collect();
        assert_eq!(
            topics,
            [("edgeinfer/edge-1/health", true), ("edgeinfer/edge-1/metrics", false)]
        );
        assert_eq!(sent[1].qos, Qos::AtMostOnce);
    }

    #[test]
    fn a_swap_report_goes_to_the_events_topic_and_refreshes_health() {
        let r = rig("");
        let mut s = r.serving();
        let mut el = AsyncClient::new(MqttOptions::new("x", "h", 1), 8).1;
        s.on_connack(&mut el, &connack(false));
        r.rec.take_sent();
        let report = crate::pipeline::swap::SwapReport {
            result: SwapResult::Swapped,
            trigger: "file".into(),
            at_us: 1,
            duration_ms: 3.0,
            from_version: "1".into(),
            from_sha256: "a".repeat(64),
            to_version: Some("2".into()),
            to_sha256: Some("b".repeat(64)),
            golden_checked: 0,
            reason: None,
        };
        s.on_swap_report(reload::SwapReportFor { pipeline: 0, report });
        let sent = r.rec.take_sent();
        let topics: Vec<&str> = sent.iter().map(|s| s.topic.as_str()).collect();
        assert_eq!(topics, ["edgeinfer/edge-1/events", "edgeinfer/edge-1/health"]);
        let v = sent[0].json();
        assert_eq!(
            (v["event"].as_str(), v["pipeline"].as_str()),
            (Some("model_swap"), Some("digits"))
        );
    }
}
