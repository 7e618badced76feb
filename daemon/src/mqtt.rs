//! The MQTT client side: connection options from config (session, limits, credentials, TLS, Last
//! Will), and the [`Publisher`] the worker threads use.
//!
//! The event loop itself is driven by `app` (one task owns it; see `app::run_connection`). This
//! module does not route frames or know about pipelines.

use std::fs;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rumqttc::{
    AsyncClient, ClientError, EventLoop, LastWill, MqttOptions, QoS, TlsConfiguration, Transport,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::{BrokerConfig, MAX_PAYLOAD_LIMIT, Qos};
use crate::publish::{PublishError, Publisher};

/// Errors preparing the MQTT connection (the connection itself retries forever).
#[derive(Debug, thiserror::Error)]
pub enum MqttError {
    #[error("cannot read {what} {path}")]
    File {
        what: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} {path} contains no usable PEM {expected}; hint: the file must be PEM-encoded")]
    Pem { what: &'static str, path: String, expected: &'static str },
    #[error("TLS configuration rejected: {0}")]
    Tls(#[from] rustls::Error),
    #[error("no trusted CA certificates found in the system store; hint: set broker.tls.ca_file")]
    NoRoots,
    #[error(
        "{what} {path} is readable by group or others (mode {mode:04o}); refusing to use it; \
         hint: chmod 600 {path} (owned by the service user)"
    )]
    LoosePermissions { what: &'static str, path: String, mode: u32 },
}

/// Refuses a secret (private key) file that group or others may read.
fn check_private(what: &'static str, path: &std::path::Path) -> Result<(), MqttError> {
    use std::os::unix::fs::PermissionsExt;
    let meta = fs::metadata(path).map_err(|source| MqttError::File {
        what,
        path: path.display().to_string(),
        source,
    })?;
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(MqttError::LoosePermissions { what, path: path.display().to_string(), mode });
    }
    Ok(())
}

pub fn qos(q: Qos) -> QoS {
    match q {
        Qos::AtMostOnce => QoS::AtMostOnce,
        Qos::AtLeastOnce => QoS::AtLeastOnce,
        Qos::ExactlyOnce => QoS::ExactlyOnce,
    }
}

/// Connection options from the broker config. `will` is the (topic, payload) of the retained
/// Last Will that marks the daemon offline if the connection dies.
pub fn options(b: &BrokerConfig, will: (String, Vec<u8>)) -> Result<MqttOptions, MqttError> {
    let mut o = connection(b, b.client_id.clone())?;
    o.set_clean_session(b.clean_session);
    // rumqttc defaults to 10 KiB; frames are often larger. Outgoing results (e.g. 1000-class
    // score vectors as JSON) can be large too; the broker enforces its own limit.
    o.set_max_packet_size(b.max_packet_size as usize, MAX_PAYLOAD_LIMIT as usize);
    o.set_inflight(b.inflight);
    // QoS 1 frames are acknowledged by the ingest task only once the daemon has taken
    // responsibility for them (queued, rejected or dropped-and-counted). Frames that arrive
    // during shutdown are left unacknowledged, so a persistent session redelivers them.
    o.set_manual_acks(true);
    o.set_last_will(LastWill::new(will.0, will.1, QoS::AtLeastOnce, true));
    Ok(o)
}

/// Options for a short-lived observer of the daemon's own topics (`edgeinfer health`): the same
/// broker, credentials and TLS as the daemon, its own client id (so it never takes over the
/// daemon's session), a clean session and no Last Will.
pub fn observer_options(b: &BrokerConfig, client_id: String) -> Result<MqttOptions, MqttError> {
    let mut o = connection(b, client_id)?;
    o.set_clean_session(true);
    // Health messages grow with the pipelines; rumqttc's 10 KiB default is too small.
    o.set_max_packet_size(b.max_packet_size as usize, MAX_PAYLOAD_LIMIT as usize);
    Ok(o)
}

/// What every connection of ours shares: address, keepalive, credentials, TLS.
fn connection(b: &BrokerConfig, client_id: String) -> Result<MqttOptions, MqttError> {
    let mut o = MqttOptions::new(client_id, b.host.clone(), b.port);
    o.set_keep_alive(b.keepalive);
    if let Some(user) = &b.username {
        let pass = match &b.password {
            Some(p) => {
                // A password file others can read is as bad as a readable private key.
                if let crate::config::Secret::File(f) = p {
                    check_private("password file", f)?;
                }
                p.read().map_err(|source| MqttError::File {
                    what: "password",
                    path: p.path().map_or_else(|| "(inline)".into(), |f| f.display().to_string()),
                    source,
                })?
            }
            None => String::new(),
        };
        o.set_credentials(user.clone(), pass);
    }
    if let Some(tls) = &b.tls {
        o.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(Arc::new(
            tls_config(tls)?,
        ))));
    }
    Ok(o)
}

fn read(what: &'static str, path: &std::path::Path) -> Result<Vec<u8>, MqttError> {
    fs::read(path).map_err(|source| MqttError::File {
        what,
        path: path.display().to_string(),
        source,
    })
}

/// Every PEM certificate in a file; none at all is an error naming the file.
fn read_certs(
    what: &'static str,
    path: &std::path::Path,
) -> Result<Vec<CertificateDer<'static>>, MqttError> {
    let pem = read(what, path)?;
    let certs: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(&pem).filter_map(Result::ok).collect();
    if certs.is_empty() {
        return Err(MqttError::Pem {
            what,
            path: path.display().to_string(),
            expected: "certificate",
        });
    }
    Ok(certs)
}

fn tls_config(t: &crate::config::TlsConfig) -> Result<rustls::ClientConfig, MqttError> {
    let mut roots = rustls::RootCertStore::empty();
    match &t.ca_file {
        Some(ca) => {
            for c in read_certs("CA file", ca)? {
                roots.add(c)?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            for c in found.certs {
                // Individual unparsable system certificates are skipped, as browsers do.
                let _ = roots.add(c);
            }
            if roots.is_empty() {
                return Err(MqttError::NoRoots);
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
    let cfg = match (&t.cert_file, &t.key_file) {
        (Some(cert), Some(key)) => {
            let chain = read_certs("client certificate", cert)?;
            check_private("client key", key)?;
            let key_pem = read("client key", key)?;
            let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|_| MqttError::Pem {
                what: "client key",
                path: key.display().to_string(),
                expected: "private key",
            })?;
            builder.with_client_auth_cert(chain, key)?
        }
        _ => builder.with_no_client_auth(),
    };
    Ok(cfg)
}

/// A new client and its event loop. `cap` bounds the request channel between them.
pub fn client(opts: MqttOptions, cap: usize) -> (AsyncClient, EventLoop) {
    AsyncClient::new(opts, cap)
}

/// [`Publisher`] over rumqttc's request channel, usable from plain threads.
///
/// Waiting for room is a short sleep-and-retry loop rather than `block_on` on the runtime: it
/// keeps worker threads independent of the tokio runtime's lifetime (a worker finishing its last
/// frame after the runtime shut down gets an error, not a panic). The channel is sized so that
/// it is rarely full.
pub struct MqttPublisher {
    client: AsyncClient,
    timeout: Duration,
}

impl MqttPublisher {
    pub fn new(client: AsyncClient, timeout: Duration) -> Self {
        Self { client, timeout }
    }
}

fn map_err(e: ClientError) -> PublishError {
    match e {
        ClientError::TryRequest(rumqttc::Request::Publish(p))
        | ClientError::Request(rumqttc::Request::Publish(p))
            if !rumqttc::valid_topic(&p.topic) =>
        {
            PublishError::Topic(p.topic)
        }
        ClientError::TryRequest(_) => PublishError::Full,
        ClientError::Request(_) => PublishError::Closed,
    }
}

/// rumqttc writes a topic's length as a u16 without checking it: a longer topic would corrupt
/// the connection's byte stream (the broker reads garbage as the next packet). Every publish
/// goes through this first.
fn check_topic(topic: &str) -> Result<(), PublishError> {
    if topic.len() > crate::topic::MQTT_TOPIC_LIMIT {
        return Err(PublishError::Topic(format!(
            "{}… ({} bytes, above MQTT's {})",
            crate::topic::shorten(topic, 64),
            topic.len(),
            crate::topic::MQTT_TOPIC_LIMIT
        )));
    }
    Ok(())
}

impl Publisher for MqttPublisher {
    fn publish(
        &self,
        topic: &str,
        payload: &[u8],
        q: Qos,
        retain: bool,
    ) -> Result<(), PublishError> {
        check_topic(topic)?;
        let deadline = Instant::now() + self.timeout;
        // rumqttc owns what it sends: the one copy of the result on its way out.
        let mut payload = payload.to_vec();
        let mut pause = Duration::from_micros(200);
        loop {
            match self.client.try_publish(topic, qos(q), retain, payload) {
                Ok(()) => return Ok(()),
                Err(ClientError::TryRequest(rumqttc::Request::Publish(p)))
                    if rumqttc::valid_topic(topic) =>
                {
                    if Instant::now() >= deadline {
                        return Err(PublishError::Timeout(self.timeout));
                    }
                    payload = p.payload.into();
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_millis(20));
                }
                Err(e) => return Err(map_err(e)),
            }
        }
    }

    fn try_publish(
        &self,
        topic: &str,
        payload: Vec<u8>,
        q: Qos,
        retain: bool,
    ) -> Result<(), PublishError> {
        check_topic(topic)?;
        self.client.try_publish(topic, qos(q), retain, payload).map_err(map_err)
    }
}
