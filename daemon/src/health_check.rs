//! `edgeinfer health [--wait]`: is the daemon on this device healthy? The commit gate of an A/B
//! update (`edgeinfer-health-gate.service`, required by `boot-complete.target`) runs it after
//! booting a new slot, so the OTA client commits the slot only when inference works.
//!
//! It reads what the daemon itself publishes: the retained health message on `health.topic`,
//! through the broker named in the same config file (same credentials and TLS, its own client id
//! and a clean session). That is the one signal that proves the whole path (the daemon is up, its
//! models are loaded and warmed up, since it only connects after that, and it reaches the broker),
//! and it works with every configuration: the Prometheus endpoint is optional and off by default.
//!
//! Healthy means: `status` is `online`, every configured pipeline is present with a loaded model,
//! and no pipeline's SLO is `breached`. With `--wait`, only messages published while we watch
//! count (a retained message may be left over from the previous boot): the daemon must stay
//! healthy, as the same process (pid and start time), for `--window` from the first fresh healthy
//! message; any unhealthy message restarts the window. It gives up at `--timeout` with the last
//! reason. Without `--wait`, the current retained message is judged once.
//!
//! Not here: what happens next (committing the slot, rolling back) belongs to the OTA client and
//! the bootloader; this module only answers the question.

use std::time::Duration;

use rumqttc::{Event, Packet, QoS};
use serde_json::Value;
use tokio::time::Instant;

use crate::config::Config;
use crate::mqtt::{self, MqttError};

/// How to judge.
#[derive(Debug, Clone, Copy)]
pub struct CheckOptions {
    /// Wait for fresh messages and a healthy window (the commit gate), instead of judging the
    /// retained message once.
    pub wait: bool,
    /// Give up after this long.
    pub timeout: Duration,
    /// How long the daemon must stay healthy (`--wait` only).
    pub window: Duration,
}

/// Why the check could not say "healthy".
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error("cannot prepare the MQTT connection for the health check")]
    Mqtt(#[source] MqttError),
    #[error("cannot start the health check's runtime")]
    Runtime(#[source] std::io::Error),
    #[error("edgeinfer is not healthy after {waited:.1?}: {reason}")]
    NotHealthy { waited: Duration, reason: String },
}

/// What a healthy daemon reported.
#[derive(Debug, Clone, PartialEq)]
pub struct Healthy {
    pub device: String,
    pub pid: u64,
    pub started_us: u64,
    pub pipelines: usize,
    pub slot: Option<String>,
    pub image_version: Option<String>,
}

impl std::fmt::Display for Healthy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "edgeinfer on {} is healthy: pid {}, {} pipeline(s) with models loaded and warmed up, \
             no SLO breached",
            self.device, self.pid, self.pipelines
        )?;
        if let Some(slot) = &self.slot {
            write!(f, ", slot {slot}")?;
        }
        if let Some(v) = &self.image_version {
            write!(f, ", image {v}")?;
        }
        Ok(())
    }
}

/// Judges one health message against the pipelines the config names.
pub fn assess(v: &Value, pipelines: &[&str]) -> Result<Healthy, String> {
    let status = v["status"].as_str().unwrap_or("(no status)");
    if status != "online" {
        let reason = v["reason"].as_str().map(|r| format!(" ({r})")).unwrap_or_default();
        return Err(format!("the daemon reports itself {status}{reason}"));
    }
    let reported = v["pipelines"].as_object();
    for name in pipelines {
        let Some(p) = reported.and_then(|r| r.get(*name)) else {
            return Err(format!(
                "pipeline {name} is missing from the health message; hint: is the daemon running \
                 this config file?"
            ));
        };
        if p["model"]["sha256"].as_str().is_none_or(str::is_empty) {
            return Err(format!("pipeline {name} has no model loaded"));
        }
        if p["slo"]["state"] == "breached" {
            let objectives: Vec<String> = ["latency", "served"]
                .iter()
                .filter(|k| p["slo"][**k]["state"] == "breached")
                .map(|k| {
                    let o = &p["slo"][*k];
                    match (o["measured_s"].as_f64(), o["threshold_s"].as_f64()) {
                        (Some(m), Some(t)) => format!("{k} {:.1}ms > {:.1}ms", m * 1e3, t * 1e3),
                        _ => format!(
                            "{k} compliance {:.4} < {}",
                            o["long"]["compliance"].as_f64().unwrap_or(0.0),
                            o["target"].as_f64().unwrap_or(1.0)
                        ),
                    }
                })
                .collect();
            return Err(format!("pipeline {name}: SLO breached ({})", objectives.join(", ")));
        }
    }
    let boot = &v["boot"];
    Ok(Healthy {
        device: v["device"].as_str().unwrap_or_default().to_string(),
        pid: v["pid"].as_u64().unwrap_or(0),
        started_us: v["started_us"].as_u64().unwrap_or(0),
        pipelines: reported.map_or(0, |r| r.len()),
        slot: boot["slot"].as_str().map(str::to_string),
        image_version: boot["image_version"]
            .as_str()
            .or_else(|| boot["version_id"].as_str())
            .map(str::to_string),
    })
}

/// The `--wait` bookkeeping: since when the same daemon process has been healthy.
#[derive(Debug, Default)]
struct Window {
    since: Option<(Instant, u64, u64)>,
}

impl Window {
    /// Feeds one fresh message's verdict; `true` once the daemon has been healthy for `window`.
    fn feed(&mut self, now: Instant, verdict: &Result<Healthy, String>, window: Duration) -> bool {
        match verdict {
            Ok(h) => {
                let same =
                    matches!(self.since, Some((_, pid, st)) if pid == h.pid && st == h.started_us);
                if !same {
                    self.since = Some((now, h.pid, h.started_us));
                }
                self.since.is_some_and(|(t0, _, _)| now.duration_since(t0) >= window)
            }
            Err(_) => {
                self.since = None;
                false
            }
        }
    }
}

/// Connects with the config's broker settings and judges the daemon's health.
pub fn check(config: &Config, opts: CheckOptions) -> Result<Healthy, CheckError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(CheckError::Runtime)?;
    rt.block_on(check_async(config, opts))
}

async fn check_async(config: &Config, opts: CheckOptions) -> Result<Healthy, CheckError> {
    let topic = config.health.topic.render(&config.device_id, "");
    let target = format!("{}:{}", config.broker.host, config.broker.port);
    let client_id = format!("{}-health-{}", config.broker.client_id, std::process::id());
    let mqtt_opts = mqtt::observer_options(&config.broker, client_id).map_err(CheckError::Mqtt)?;
    let (client, mut el) = mqtt::client(mqtt_opts, 16);
    let pipelines: Vec<&str> = config.pipelines.iter().map(|p| p.name.as_str()).collect();
    let start = Instant::now();
    let deadline = start + opts.timeout;
    let mut reason = format!("no health message on {topic} yet; hint: is edgeinfer running?");
    let mut window = Window::default();
    loop {
        let event = match tokio::time::timeout_at(deadline, el.poll()).await {
            Err(_) => return Err(CheckError::NotHealthy { waited: start.elapsed(), reason }),
            Ok(e) => e,
        };
        match event {
            Err(e) => {
                // The event loop reconnects on the next poll; do not spin while the broker is down.
                reason = format!("broker {target} unreachable: {e}");
                window.since = None;
                let pause = Instant::now() + Duration::from_millis(250);
                tokio::time::sleep_until(pause.min(deadline)).await;
            }
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                // A clean session forgets subscriptions: subscribe on every connection.
                if let Err(e) = client.try_subscribe(topic.clone(), QoS::AtLeastOnce) {
                    reason = format!("cannot subscribe to {topic}: {e}");
                }
            }
            Ok(Event::Incoming(Packet::Publish(p))) if p.topic == topic => {
                let verdict = match serde_json::from_slice::<Value>(&p.payload) {
                    Ok(v) => assess(&v, &pipelines),
                    Err(e) => Err(format!("the health message is not JSON: {e}")),
                };
                if !opts.wait {
                    return verdict.map_err(|reason| CheckError::NotHealthy {
                        waited: start.elapsed(),
                        reason,
                    });
                }
                if p.retain {
                    // Possibly from before this boot: informative, never proof.
                    if let Err(r) = &verdict {
                        reason = format!("last retained health message: {r}");
                    }
                    continue;
                }
                let now = Instant::now();
                if window.feed(now, &verdict, opts.window) {
                    let _ = client.try_disconnect();
                    return verdict.map_err(|reason| CheckError::NotHealthy {
                        waited: start.elapsed(),
                        reason,
                    });
                }
                match verdict {
                    Ok(h) => {
                        let left = window.since.map_or(opts.window, |(t0, _, _)| {
                            opts.window.saturating_sub(now.duration_since(t0))
                        });
                        log::info!("healthy so far (pid {}); watching {left:.1?} more", h.pid);
                        reason = format!(
                            "healthy, but not yet for the whole window of {:?}",
                            opts.window
                        );
                    }
                    Err(r) => {
                        log::info!("not healthy yet: {r}");
                        reason = r;
                    }
                }
            }
            Ok(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn online(slo: &str) -> Value {
        json!({
            "status": "online", "device": "edge-01", "pid": 42, "started_us": 7,
            "boot": {"slot": "b", "image_version": "1.2.0"},
            "pipelines": {"digits": {"model": {"sha256": "ab12"}, "slo": {"state": slo,
                "latency": {"state": slo, "measured_s": 0.08, "threshold_s": 0.05, "target": 0.99}}}}
        })
    }

    #[test]
    fn healthy_message_reports_slot_and_image() {
        let h = assess(&online("ok"), &["digits"]).expect("healthy");
        assert_eq!((h.pid, h.pipelines, h.slot.as_deref()), (42, 1, Some("b")));
        assert_eq!(h.image_version.as_deref(), Some("1.2.0"));
        assert!(h.to_string().contains("slot b, image 1.2.0"), "{h}");
        assert!(assess(&online("at_risk"), &["digits"]).is_ok(), "at_risk is not a failure");
    }

    #[test]
    fn unhealthy_messages_say_why() {
        let e = assess(&online("breached"), &["digits"]).expect_err("breached");
        assert!(e.contains("SLO breached (latency 80.0ms > 50.0ms)"), "{e}");
        let e = assess(&json!({"status": "offline", "reason": "connection_lost"}), &["digits"])
            .expect_err("offline");
        assert_eq!(e, "the daemon reports itself offline (connection_lost)");
        let e = assess(&online("ok"), &["digits", "audio"]).expect_err("missing");
        assert!(e.contains("pipeline audio is missing"), "{e}");
        let mut v = online("ok");
        v["pipelines"]["digits"]["model"] = json!({});
        assert!(assess(&v, &["digits"]).expect_err("no model").contains("no model loaded"));
        assert!(assess(&json!([1, 2]), &[]).is_err(), "garbage is not healthy");
    }

    #[test]
    fn window_needs_the_same_process_healthy_throughout() {
        let w = Duration::from_secs(10);
        let t0 = Instant::now();
        let ok = |pid| {
            assess(
                &{
                    let mut v = online("ok");
                    v["pid"] = json!(pid);
                    v
                },
                &["digits"],
            )
        };
        let mut win = Window::default();
        assert!(!win.feed(t0, &ok(1), w));
        assert!(!win.feed(t0 + Duration::from_secs(5), &ok(1), w));
        // A restart (new pid) starts the window again.
        assert!(!win.feed(t0 + Duration::from_secs(11), &ok(2), w));
        assert!(!win.feed(t0 + Duration::from_secs(15), &Err("breached".into()), w));
        assert!(!win.feed(t0 + Duration::from_secs(16), &ok(2), w));
        assert!(win.feed(t0 + Duration::from_secs(26), &ok(2), w));
        // A zero window passes on the first fresh healthy message.
        assert!(Window::default().feed(t0, &ok(3), Duration::ZERO));
    }
}
