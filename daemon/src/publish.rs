//! Where results, errors, health and events are handed over: the `Publisher` trait the
//! pipelines and the serving loop publish through. Implemented over rumqttc (`mqtt`), in front
//! of the on-disk spool (`spool`), and by a recording test double (`pipeline::recorder`). Its
//! own module so that those implementations do not depend on the pipeline.

use crate::config::Qos;

/// Why a message could not be handed to the MQTT client.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("the MQTT client's request queue stayed full for {0:?}")]
    Timeout(std::time::Duration),
    #[error("the MQTT client's request queue is full")]
    Full,
    #[error("the MQTT client is shut down")]
    Closed,
    #[error("invalid topic {0:?}")]
    Topic(String),
}

/// Where pipelines send results and error messages. Implemented over rumqttc by `mqtt`.
pub trait Publisher: Send + Sync {
    /// Hands a message to the client, waiting a bounded time when its queue is full (workers).
    /// Borrowed: the implementation copies what its transport needs to own.
    fn publish(
        &self,
        topic: &str,
        payload: &[u8],
        qos: Qos,
        retain: bool,
    ) -> Result<(), PublishError>;
    /// Never waits (the ingest task must keep the MQTT event loop moving).
    fn try_publish(
        &self,
        topic: &str,
        payload: Vec<u8>,
        qos: Qos,
        retain: bool,
    ) -> Result<(), PublishError>;
}
