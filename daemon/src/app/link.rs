//! The broker connection's bookkeeping, apart from the serving loop: backoff and log levels
//! (`Link`), the oversized-packet guard that clears a poisoned session once (`PoisonGuard`),
//! and what the MQTT client held when a connection failed (`resume`, `preserve_held`).

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::time::Duration;

use rumqttc::{ConnectionError, EventLoop, Publish, QoS, Request, StateError};
use tokio::time::Instant;

use super::App;
use crate::config::Qos;
use crate::publish::Publisher;

/// Connection bookkeeping for backoff and log levels.
pub(super) struct Link {
    pub(super) connected: bool,
    pub(super) ever_connected: bool,
    pub(super) failures: u32,
    pub(super) backoff: Duration,
    pub(super) retry_at: Option<Instant>,
    /// When the current connection was acknowledged.
    pub(super) connected_at: Option<Instant>,
    pub(super) poison: PoisonGuard,
}

/// The size of the packet that ended a connection because it was above
/// `broker.max_packet_size` (the client cannot read it), if that is what happened.
pub(super) fn oversized(e: &ConnectionError) -> Option<usize> {
    match e {
        ConnectionError::MqttState(StateError::Deserialization(
            rumqttc::Error::PayloadSizeLimitExceeded(n),
        )) => Some(*n),
        _ => None,
    }
}

impl Link {
    pub(super) fn on_error(&mut self, app: &App, e: &ConnectionError, target: &str) {
        let (min, max) = (app.config.broker.reconnect_min, app.config.broker.reconnect_max);
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
pub(super) enum SessionReset {
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
pub(super) struct PoisonGuard {
    /// Consecutive connections ended by an oversized packet.
    pub(super) streak: u32,
    /// Size of the last oversized packet.
    pub(super) last_size: usize,
    pub(super) state: SessionReset,
}

impl PoisonGuard {
    /// A connection ended: by an oversized packet of `size` bytes (or another error: `None`)
    /// after being up for `lived`. True when the session must be cleared now (`limit`
    /// consecutive oversized resets; 0 never).
    pub(super) fn on_reset(
        &mut self,
        size: Option<usize>,
        lived: Option<Duration>,
        limit: u32,
    ) -> bool {
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

/// The persistent session is back after a session reset: count it and say so on the events
/// topic (the frames the broker discarded with the session cannot be counted on MQTT 3.1.1:
/// the broker does not say how many it held).
pub(super) fn session_reset_done(
    app: &App,
    g: &mut PoisonGuard,
    publisher: &dyn Publisher,
    events: &str,
) {
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

/// At CONNACK: gives the client back what it held when the connection failed. A resumed session
/// gets it as it was (rumqttc retransmits with the same packet ids, so the broker can recognise
/// QoS 2 repeats). A new session (broker restarted without persistence, session expired) would
/// make rumqttc drop it all; instead its QoS 1/2 publishes are sent again as new messages.
pub(super) fn resume(
    app: &App,
    el: &mut EventLoop,
    held: &mut VecDeque<Request>,
    session_present: bool,
) {
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
pub(super) fn preserve_held(app: &App, el: &mut EventLoop, held: &mut VecDeque<Request>) {
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
pub(super) fn ack_for(p: &Publish) -> Option<Publish> {
    (p.qos != QoS::AtMostOnce).then(|| {
        let mut a = Publish::new(String::new(), p.qos, Vec::new());
        a.pkid = p.pkid;
        a
    })
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
