//! The serving loop: one task owns the rumqttc event loop (connect, reconnect with backoff,
//! subscribe, route frames, acknowledge), publishes health and metrics, and runs the one shutdown
//! path: first signal -> drain within the grace period -> offline status -> explicit disconnect
//! (polled until written, since rumqttc never reports the request stream as done) -> return.
//! A second signal returns at once.
//!
//! This function only owns the sources (signals, the MQTT event loop, timers, the channels of
//! reload and verification threads): each `select!` arm turns one into a call of a handler of
//! `Serving` (app/serving.rs), which holds the state and says whether the loop goes on.

use std::sync::Arc;
use std::time::Duration;

use rumqttc::{AsyncClient, EventLoop};
use tokio::signal::unix::{SignalKind, signal};
use tokio::time::{Instant, MissedTickBehavior, interval, interval_at, sleep_until};

use super::serving::{Flow, Serving};
use super::{App, AppError, StopHandle, control, reload};
use crate::pipeline::WorkerHandle;
use crate::publish::Publisher;
use crate::sys::notify::Notifier;

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
    let mut sigterm = signal(SignalKind::terminate()).map_err(AppError::Signals)?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(AppError::Signals)?;
    // SIGHUP's default action would kill the daemon (`systemctl reload`); catch it.
    let mut sighup = signal(SignalKind::hangup()).map_err(AppError::Signals)?;
    let mut stop_rx = stop.subscribe();

    let (mut s, mut reports) = Serving::new(app, client, publisher, workers, notifier);

    let mut health = interval_at(Instant::now() + cfg.health.interval, cfg.health.interval);
    health.set_missed_tick_behavior(MissedTickBehavior::Skip);
    let metrics_every = cfg.metrics.interval.unwrap_or(Duration::from_secs(3600));
    let mut metrics = interval_at(Instant::now() + metrics_every, metrics_every);
    metrics.set_missed_tick_behavior(MissedTickBehavior::Skip);
    let mut control_tick = interval(control::period(app));
    control_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut drain_check = interval(Duration::from_millis(20));
    let mut watchdog_tick = interval(
        s.watchdog_period()
            .map_or(Duration::from_secs(3600), |p| (p / 4).max(Duration::from_millis(50))),
    );

    // Model file changes arrive from the watch thread.
    let (file_tx, mut file_rx) = tokio::sync::mpsc::unbounded_channel::<usize>();
    let _keep_file_channel = file_tx.clone();
    if let Err(e) = reload::watch(app, Duration::from_millis(500), file_tx) {
        log::warn!("cannot watch model files ({e}); SIGHUP and the reload command still work");
    }

    loop {
        let flow = tokio::select! {
            _ = sigterm.recv() => s.on_stop(),
            _ = sigint.recv() => s.on_stop(),
            changed = stop_rx.changed() => if changed.is_ok() { s.on_stop() } else { Flow::Continue },
            _ = sighup.recv() => s.on_sighup(),
            Some((pipeline, outcome)) = reports.verified.recv() => s.on_verified(&pipeline, outcome),
            Some(idx) = file_rx.recv() => s.on_file_change(idx),
            Some(done) = reports.swaps.recv() => s.on_swap_report(done),
            _ = watchdog_tick.tick(), if s.pings_due() => s.on_watchdog_tick(),
            _ = sleep_until(s.retry_at().unwrap_or_else(Instant::now)), if s.retry_at().is_some() => s.on_retry_due(),
            ev = el.poll(), if s.retry_at().is_none() => s.on_event(&mut el, ev).await,
            _ = health.tick() => s.on_health_tick(),
            _ = metrics.tick(), if cfg.metrics.interval.is_some() => s.on_metrics_tick(),
            _ = control_tick.tick() => s.on_control_tick(),
            _ = drain_check.tick(), if s.draining() => s.drain_tick(&mut el),
        };
        match flow {
            Flow::Continue => {}
            Flow::Exit => break,
            Flow::Abort => return Err(AppError::Aborted),
        }
    }
    s.finish();
    Ok(())
}
