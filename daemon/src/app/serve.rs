//! The serving loop: one task owns the rumqttc event loop (connect, reconnect with backoff,
//! subscribe, route frames, acknowledge), publishes health and metrics, and runs the one shutdown
//! path: first signal -> drain within the grace period -> offline status -> explicit disconnect
//! (polled until written, since rumqttc never reports the request stream as done) -> return.
//! A second signal returns at once.
//!
//! This module owns the sources (signals, the MQTT event loop, timers, the channels of reload
//! and verification threads) and turns each into one call of a handler of `Serving`
//! (app/serving.rs), which holds the state and says whether the loop goes on.
//!
//! A poll of the MQTT event loop is never cancelled: it is pinned and kept across the other
//! sources' events until it yields. Dropping it mid-way (as a `select!` over a fresh
//! `EventLoop::poll()` each turn does whenever a timer fires first) abandons a connection attempt
//! after its CONNECT was sent, so the next attempt takes over the half-open session of the same
//! client id (and the broker later publishes the Last Will), or cuts a write in the middle of a
//! packet.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use rumqttc::{AsyncClient, ConnectionError, Event, EventLoop};
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::time::{Instant, Interval, MissedTickBehavior, interval, interval_at, sleep_until};

use super::serving::{Flow, Reports, Serving};
use super::{App, AppError, StopHandle, control, reload};
use crate::ota;
use crate::pipeline::WorkerHandle;
use crate::publish::Publisher;
use crate::sys::notify::Notifier;

type MqttEvent = Result<Event, ConnectionError>;

/// What woke the loop: the MQTT event loop (handled with it, outside `dispatch`), or another
/// source.
enum Woke {
    Mqtt(MqttEvent),
    Other(Source),
}

/// A source other than the MQTT event loop.
enum Source {
    Stop,
    Sighup,
    Verified(String, ota::Outcome),
    FileChanged(usize),
    Swapped(reload::SwapReportFor),
    WatchdogTick,
    RetryDue,
    HealthTick,
    MetricsTick,
    ControlTick,
    DrainTick,
    /// Nothing to do (the stop handle's sender is gone).
    Idle,
}

/// Everything the loop waits on besides the MQTT event loop.
struct Sources {
    sigterm: Signal,
    sigint: Signal,
    sighup: Signal,
    stop: tokio::sync::watch::Receiver<u32>,
    reports: Reports,
    files: UnboundedReceiver<usize>,
    health: Interval,
    metrics: Option<Interval>,
    control: Interval,
    drain: Interval,
    watchdog: Interval,
}

impl Sources {
    /// The next event: from `mqtt` (a pinned poll of the event loop, not consumed unless it
    /// yields) when given, or from any other source.
    async fn next<F: Future<Output = MqttEvent>>(
        &mut self,
        s: &Serving<'_>,
        mqtt: Option<Pin<&mut F>>,
    ) -> Woke {
        let (polling, retry_at, pings, draining) =
            (mqtt.is_some(), s.retry_at(), s.pings_due(), s.draining());
        let Sources {
            sigterm,
            sigint,
            sighup,
            stop,
            reports,
            files,
            health,
            metrics,
            control,
            drain,
            watchdog,
        } = self;
        let stoppable = stop.has_changed().is_ok();
        let mqtt = async move {
            match mqtt {
                Some(f) => f.await,
                None => std::future::pending().await,
            }
        };
        let metrics = async move {
            match metrics.as_mut() {
                Some(i) => i.tick().await,
                None => std::future::pending().await,
            }
        };
        let src = tokio::select! {
            ev = mqtt, if polling => return Woke::Mqtt(ev),
            _ = sigterm.recv() => Source::Stop,
            _ = sigint.recv() => Source::Stop,
            changed = stop.changed(), if stoppable => {
                if changed.is_ok() { Source::Stop } else { Source::Idle }
            }
            _ = sighup.recv() => Source::Sighup,
            Some((pipeline, outcome)) = reports.verified.recv() => Source::Verified(pipeline, outcome),
            Some(idx) = files.recv() => Source::FileChanged(idx),
            Some(done) = reports.swaps.recv() => Source::Swapped(done),
            _ = watchdog.tick(), if pings => Source::WatchdogTick,
            _ = sleep_until(retry_at.unwrap_or_else(Instant::now)), if retry_at.is_some() => Source::RetryDue,
            _ = health.tick() => Source::HealthTick,
            _ = metrics => Source::MetricsTick,
            _ = control.tick() => Source::ControlTick,
            _ = drain.tick(), if draining => Source::DrainTick,
        };
        Woke::Other(src)
    }
}

/// One event from a source other than the MQTT event loop, to its handler.
fn dispatch(s: &mut Serving<'_>, src: Source) -> Flow {
    match src {
        Source::Idle => Flow::Continue,
        Source::Stop => s.on_stop(),
        Source::Sighup => s.on_sighup(),
        Source::Verified(pipeline, outcome) => s.on_verified(&pipeline, outcome),
        Source::FileChanged(idx) => s.on_file_change(idx),
        Source::Swapped(done) => s.on_swap_report(done),
        Source::WatchdogTick => s.on_watchdog_tick(),
        Source::RetryDue => s.on_retry_due(),
        Source::HealthTick => s.on_health_tick(),
        Source::MetricsTick => s.on_metrics_tick(),
        Source::ControlTick => s.on_control_tick(),
        Source::DrainTick => s.drain_tick(),
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
    let (mut s, reports) = Serving::new(app, client, publisher, workers, notifier);

    let mut health = interval_at(Instant::now() + cfg.health.interval, cfg.health.interval);
    health.set_missed_tick_behavior(MissedTickBehavior::Skip);
    let metrics = cfg.metrics.interval.map(|every| {
        let mut i = interval_at(Instant::now() + every, every);
        i.set_missed_tick_behavior(MissedTickBehavior::Skip);
        i
    });
    let mut control_tick = interval(control::period(app));
    control_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    // Model file changes arrive from the watch thread.
    let (file_tx, files) = tokio::sync::mpsc::unbounded_channel::<usize>();
    let _keep_file_channel = file_tx.clone();
    if let Err(e) = reload::watch(app, Duration::from_millis(500), file_tx) {
        log::warn!("cannot watch model files ({e}); SIGHUP and the reload command still work");
    }
    let mut sources = Sources {
        sigterm: signal(SignalKind::terminate()).map_err(AppError::Signals)?,
        sigint: signal(SignalKind::interrupt()).map_err(AppError::Signals)?,
        // SIGHUP's default action would kill the daemon (`systemctl reload`); catch it.
        sighup: signal(SignalKind::hangup()).map_err(AppError::Signals)?,
        stop: stop.subscribe(),
        reports,
        files,
        health,
        metrics,
        control: control_tick,
        drain: interval(Duration::from_millis(20)),
        watchdog: interval(
            s.watchdog_period()
                .map_or(Duration::from_secs(3600), |p| (p / 4).max(Duration::from_millis(50))),
        ),
    };

    loop {
        let flow = if s.retry_at().is_some() {
            // Backing off: no poll in progress.
            match sources.next::<std::future::Pending<MqttEvent>>(&s, None).await {
                Woke::Other(src) => dispatch(&mut s, src),
                Woke::Mqtt(_) => Flow::Continue, // no poll was given: never
            }
        } else {
            // One poll of the event loop, kept until it yields; the other sources are served
            // meanwhile by handlers that do not touch the event loop.
            let ev = {
                let poll = el.poll();
                tokio::pin!(poll);
                loop {
                    match sources.next(&s, Some(poll.as_mut())).await {
                        Woke::Mqtt(ev) => break Ok(ev),
                        Woke::Other(src) => match dispatch(&mut s, src) {
                            Flow::Continue => {}
                            flow => break Err(flow),
                        },
                    }
                }
            };
            match ev {
                Ok(ev) => s.on_event(&mut el, ev).await,
                Err(flow) => flow,
            }
        };
        match flow {
            Flow::Continue => {}
            Flow::Exit => break,
            Flow::Abort => return Err(AppError::Aborted),
            Flow::Preserve => {
                s.preserve(&mut el);
                break;
            }
        }
    }
    s.finish();
    Ok(())
}
