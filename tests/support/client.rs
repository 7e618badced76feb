//! A real MQTT client for the tests (rumqttc, synchronous), with received messages and
//! acknowledgements as channels.

use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use bytes::Bytes;
use rumqttc::{Client, Event, MqttOptions, Packet, QoS};
use serde_json::Value;

use crate::eventually;

/// A received MQTT message.
#[derive(Debug, Clone)]
pub struct Msg {
    pub topic: String,
    pub payload: Bytes,
    pub retain: bool,
}

impl Msg {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.payload).unwrap_or_else(|e| {
            panic!("non-JSON payload on {}: {e}: {:?}", self.topic, self.payload)
        })
    }
}

/// A real MQTT client (rumqttc) for devices and observers in tests.
pub struct MqttClient {
    client: Client,
    rx: Receiver<Msg>,
    acks: Arc<Mutex<Acks>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

#[derive(Default)]
struct Acks {
    suback: u64,
    puback: u64,
    connected: bool,
}

impl MqttClient {
    pub fn connect(port: u16, id: &str) -> Result<Self> {
        Self::connect_with(port, id, true)
    }

    /// A client with a persistent session (`clean_session = false`): across a broker restart
    /// it resends unacknowledged publishes and the broker keeps its subscriptions.
    pub fn connect_persistent(port: u16, id: &str) -> Result<Self> {
        Self::connect_with(port, id, false)
    }

    fn connect_with(port: u16, id: &str, clean: bool) -> Result<Self> {
        let mut o = MqttOptions::new(id, "127.0.0.1", port);
        o.set_clean_session(clean);
        o.set_keep_alive(Duration::from_secs(30));
        o.set_max_packet_size(16 << 20, 16 << 20);
        o.set_inflight(1000);
        let (client, mut conn) = Client::new(o, 10_000);
        let (tx, rx) = mpsc::channel();
        let acks = Arc::new(Mutex::new(Acks::default()));
        let a2 = Arc::clone(&acks);
        let thread = std::thread::spawn(move || {
            for ev in conn.iter() {
                match ev {
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let _ = tx.send(Msg {
                            topic: p.topic.clone(),
                            payload: p.payload.clone(),
                            retain: p.retain,
                        });
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        a2.lock().map(|mut a| a.suback += 1).unwrap_or(())
                    }
                    Ok(Event::Incoming(Packet::PubAck(_))) => {
                        a2.lock().map(|mut a| a.puback += 1).unwrap_or(())
                    }
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        a2.lock().map(|mut a| a.connected = true).unwrap_or(())
                    }
                    Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => break,
                    Ok(_) => {}
                    Err(_) => std::thread::sleep(Duration::from_millis(50)),
                }
            }
        });
        let c = MqttClient { client, rx, acks, thread: Some(thread) };
        if !eventually(Duration::from_secs(10), || c.acks.lock().is_ok_and(|a| a.connected)) {
            bail!("test client {id} could not connect to 127.0.0.1:{port}");
        }
        Ok(c)
    }

    /// Subscribes and waits for the broker's SUBACK, so nothing published afterwards is missed.
    pub fn subscribe(&self, filter: &str) -> Result<()> {
        self.subscribe_qos(filter, QoS::AtLeastOnce)
    }

    /// `subscribe` with a chosen QoS.
    pub fn subscribe_qos(&self, filter: &str, qos: QoS) -> Result<()> {
        let before = self.acks.lock().map(|a| a.suback).unwrap_or(0);
        self.client.subscribe(filter, qos)?;
        if !eventually(Duration::from_secs(10), || {
            self.acks.lock().is_ok_and(|a| a.suback > before)
        }) {
            bail!("no SUBACK for {filter}");
        }
        Ok(())
    }

    pub fn publish(
        &self,
        topic: &str,
        payload: impl Into<Vec<u8>>,
        qos: QoS,
        retain: bool,
    ) -> Result<()> {
        self.client.publish(topic, qos, retain, payload)?;
        Ok(())
    }

    /// Number of PUBACKs received so far (QoS 1 publishes confirmed by the broker).
    pub fn pubacks(&self) -> u64 {
        self.acks.lock().map(|a| a.puback).unwrap_or(0)
    }

    /// Next message, or `None` after `timeout`.
    pub fn recv(&self, timeout: Duration) -> Option<Msg> {
        self.rx.recv_timeout(timeout).ok()
    }

    /// Collects messages until `done` says enough, or fails after `timeout`.
    pub fn collect_until(
        &self,
        timeout: Duration,
        mut done: impl FnMut(&[Msg]) -> bool,
    ) -> Result<Vec<Msg>> {
        let deadline = Instant::now() + timeout;
        let mut out = Vec::new();
        while !done(&out) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                let topics: Vec<&str> = out.iter().map(|m| m.topic.as_str()).collect();
                bail!("timed out after {timeout:?} with {} message(s): {topics:?}", out.len());
            }
            if let Some(m) = self.recv(left.min(Duration::from_millis(200))) {
                out.push(m);
            }
        }
        Ok(out)
    }

    /// Waits for the first message on `topic` whose JSON satisfies `pred`.
    pub fn wait_json(
        &self,
        topic: &str,
        timeout: Duration,
        mut pred: impl FnMut(&Value) -> bool,
    ) -> Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!("no matching message on {topic} within {timeout:?}");
            }
            if let Some(m) = self.recv(left)
                && m.topic == topic
            {
                let v = m.json();
                if pred(&v) {
                    return Ok(v);
                }
            }
        }
    }
}

impl Drop for MqttClient {
    fn drop(&mut self) {
        let _ = self.client.disconnect();
        if let Some(t) = self.thread.take() {
            // The connection thread exits once DISCONNECT is written (or the broker is gone).
            let deadline = Instant::now() + Duration::from_secs(2);
            while !t.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}
