//! Test double for the MQTT client: a publisher that records every message in order (the broker
//! paths are covered by the integration tests). Shared by the pipeline and serving-loop tests.

use std::sync::Mutex;

use crate::config::Qos;
use crate::publish::{PublishError, Publisher};

/// One recorded message.
#[derive(Debug, Clone)]
pub(crate) struct Sent {
    pub topic: String,
    pub payload: Vec<u8>,
    pub qos: Qos,
    pub retain: bool,
}

impl Sent {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.payload).expect("json payload")
    }
}

/// Records everything published, in order.
#[derive(Default)]
pub(crate) struct Recorder {
    msgs: Mutex<Vec<Sent>>,
}

impl Recorder {
    /// Everything recorded so far as (topic, JSON payload), emptying the record.
    pub fn take(&self) -> Vec<(String, serde_json::Value)> {
        self.take_sent().into_iter().map(|s| (s.json(), s.topic)).map(|(v, t)| (t, v)).collect()
    }

    /// Everything recorded so far, emptying the record.
    pub fn take_sent(&self) -> Vec<Sent> {
        std::mem::take(&mut *self.msgs.lock().expect("lock"))
    }
}

impl Publisher for Recorder {
    fn publish(
        &self,
        topic: &str,
        payload: &[u8],
        qos: Qos,
        retain: bool,
    ) -> Result<(), PublishError> {
        self.msgs.lock().expect("lock").push(Sent {
            topic: topic.to_string(),
            payload: payload.to_vec(),
            qos,
            retain,
        });
        Ok(())
    }
    fn try_publish(
        &self,
        topic: &str,
        payload: Vec<u8>,
        qos: Qos,
        retain: bool,
    ) -> Result<(), PublishError> {
        self.publish(topic, &payload, qos, retain)
    }
}
