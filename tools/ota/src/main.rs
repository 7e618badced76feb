//! `edgeinfer-ota`: key generation, and signed, resumable model delivery to an edgeinfer device
//! over MQTT (protocol: `daemon/src/ota.rs`, `docs/models.md`).
//!
//!   edgeinfer-ota keygen --out fleet.key [--id fleet-2026]
//!   edgeinfer-ota push --broker 127.0.0.1:1883 --device edge-01 --pipeline digits \
//!       --model digits-v2.onnx --version 2 --key fleet.key --key-id fleet-2026
//!
//! `push` publishes the signed manifest, streams the chunks, and then follows the device's
//! status: chunks the device reports missing (after a lost connection, a broker restart or a
//! device restart) are sent again, and the manifest is re-published after a reconnect so the
//! device says where it stands. It exits 0 once the device reports `installed`, 1 on
//! `rejected` (with the reason), 2 when it gives up.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use base64::Engine;
use clap::{Parser, Subcommand};
use ed25519_dalek::{Signer, SigningKey};
use edgeinfer::ota::Manifest;
use rumqttc::{Client, Event, MqttOptions, Packet, QoS};
use sha2::{Digest, Sha256};

#[derive(Parser)]
#[command(version, about = "Sign and deliver models to edgeinfer devices over MQTT")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create a signing key (private seed, mode 0600) and print its public key for the
    /// devices' `[ota.trusted_keys]`.
    Keygen {
        #[arg(long)]
        out: PathBuf,
        /// Key id the devices know it by.
        #[arg(long, default_value = "fleet")]
        id: String,
    },
    /// Sign a model and deliver it to one device's pipeline.
    Push {
        #[arg(long, default_value = "127.0.0.1:1883")]
        broker: String,
        #[arg(long)]
        device: String,
        #[arg(long)]
        pipeline: String,
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        version: String,
        /// Private key file from `keygen`.
        #[arg(long)]
        key: PathBuf,
        #[arg(long, default_value = "fleet")]
        key_id: String,
        #[arg(long, default_value_t = 65536)]
        chunk_size: u64,
        /// Allow a version that is not newer than the running one (signed into the manifest).
        #[arg(long)]
        force: bool,
        /// OTA base topic (`{device}` is replaced).
        #[arg(long, default_value = "edgeinfer/{device}/ota")]
        topic: String,
        /// Give up after this many seconds without a final status.
        #[arg(long, default_value_t = 300)]
        timeout: u64,
    },
}

fn main() -> std::process::ExitCode {
    match run(Cli::parse()) {
        Ok(code) => std::process::ExitCode::from(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}

fn run(cli: Cli) -> Result<u8> {
    match cli.cmd {
        Cmd::Keygen { out, id } => keygen(&out, &id).map(|()| 0),
        Cmd::Push {
            broker,
            device,
            pipeline,
            model,
            version,
            key,
            key_id,
            chunk_size,
            force,
            topic,
            timeout,
        } => {
            let base = topic.replace("{device}", &device);
            let sk = read_key(&key)?;
            let bytes =
                std::fs::read(&model).with_context(|| format!("reading {}", model.display()))?;
            let mut m = Manifest {
                pipeline,
                version,
                size: bytes.len() as u64,
                sha256: Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect(),
                chunk_size,
                key_id,
                force,
                signature: String::new(),
            };
            m.signature = b64().encode(sk.sign(&m.signed_bytes()).to_bytes());
            push(&broker, &base, &m, &bytes, Duration::from_secs(timeout))
        }
    }
}

fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::STANDARD
}

fn keygen(out: &PathBuf, id: &str) -> Result<()> {
    let mut seed = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut seed))
        .context("reading /dev/urandom")?;
    let sk = SigningKey::from_bytes(&seed);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(out)
        .with_context(|| format!("creating {} (it must not exist yet)", out.display()))?;
    writeln!(f, "{}", b64().encode(seed))?;
    let public = b64().encode(sk.verifying_key().to_bytes());
    println!("private key written to {} (mode 0600; keep it off devices)", out.display());
    println!("devices trust it with:\n\n[ota.trusted_keys]\n{id} = \"{public}\"");
    Ok(())
}

fn read_key(path: &PathBuf) -> Result<SigningKey> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let seed: [u8; 32] = b64()
        .decode(text.trim())
        .context("the key file is not base64")?
        .try_into()
        .map_err(|_| anyhow::anyhow!("the key file does not hold a 32-byte ed25519 seed"))?;
    Ok(SigningKey::from_bytes(&seed))
}

enum Msg {
    Connected,
    Status(serde_json::Value),
}

fn push(broker: &str, base: &str, m: &Manifest, bytes: &[u8], timeout: Duration) -> Result<u8> {
    let (host, port) = broker.rsplit_once(':').context("--broker is host:port")?;
    let id = format!("edgeinfer-ota-{}", std::process::id());
    let mut o = MqttOptions::new(id, host, port.parse::<u16>().context("broker port")?);
    o.set_keep_alive(Duration::from_secs(10));
    o.set_max_packet_size(4 << 20, 4 << 20);
    o.set_inflight(64);
    let (client, mut conn) = Client::new(o, 64);
    let status_topic = format!("{base}/{}/status", m.pipeline);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for ev in conn.iter() {
            let msg = match ev {
                Ok(Event::Incoming(Packet::ConnAck(_))) => Some(Msg::Connected),
                // Retained statuses describe an earlier attempt; every answer to this one is live.
                Ok(Event::Incoming(Packet::Publish(p))) if !p.retain => {
                    serde_json::from_slice(&p.payload).ok().map(Msg::Status)
                }
                Ok(_) => None,
                Err(_) => {
                    // The connection dropped; rumqttc reconnects on the next poll.
                    std::thread::sleep(Duration::from_millis(500));
                    None
                }
            };
            if let Some(msg) = msg
                && tx.send(msg).is_err()
            {
                return;
            }
        }
    });
    let manifest = serde_json::to_vec(m)?;
    let send_chunk = |n: u64| -> Result<()> {
        let s = (n * m.chunk_size) as usize;
        let e = (s + m.chunk_size as usize).min(bytes.len());
        client.publish(
            format!("{base}/{}/chunk/{n}", m.pipeline),
            QoS::AtLeastOnce,
            false,
            bytes[s..e].to_vec(),
        )?;
        Ok(())
    };
    // Offers the manifest; the device answers with a status saying what it has.
    let offer = || {
        client.publish(
            format!("{base}/{}/manifest", m.pipeline),
            QoS::AtLeastOnce,
            false,
            manifest.clone(),
        )
    };
    let deadline = Instant::now() + timeout;
    let mut streamed = false;
    // Set when the manifest is offered again after the stream: the next status answers it, and
    // its `missing` list is what to send again.
    let mut resend = false;
    let mut last_activity = Instant::now();
    eprintln!(
        "pushing {} ({} bytes, {} chunks, sha256 {}) to {base}/{}",
        m.version,
        m.size,
        m.chunks(),
        &m.sha256[..12],
        m.pipeline
    );
    loop {
        if Instant::now() >= deadline {
            eprintln!("gave up after {timeout:?} without a final status");
            return Ok(2);
        }
        match rx.recv_timeout(Duration::from_secs(5)) {
            Ok(Msg::Connected) => {
                // (Re)subscribe and offer the manifest: the device answers with what it has.
                client.subscribe(&status_topic, QoS::AtLeastOnce)?;
                offer()?;
                resend = streamed;
                last_activity = Instant::now();
            }
            Ok(Msg::Status(v)) => {
                if v["sha256"] != m.sha256.as_str() {
                    continue; // an older transfer's retained status
                }
                last_activity = Instant::now();
                let state = v["state"].as_str().unwrap_or("");
                eprintln!("device: {state} {}/{}", v["received"], v["chunks"]);
                match state {
                    "installed" => {
                        println!("installed version {} on {base}/{}", m.version, m.pipeline);
                        return Ok(0);
                    }
                    "rejected" => {
                        println!("rejected: {}", v["reason"].as_str().unwrap_or("?"));
                        return Ok(1);
                    }
                    "receiving" if !streamed || resend => {
                        // The first answer starts the stream: everything for a new transfer, only
                        // what the device still needs for a resumed one. Later answers to a
                        // re-offered manifest (after a reconnect or a quiet period) resend what
                        // a broker or device restart lost. `missing` lists at most 256; the next
                        // quiet period asks for the rest.
                        let resume = streamed || v["received"].as_u64().unwrap_or(0) > 0;
                        if !streamed && resume {
                            eprintln!(
                                "resuming: the device has {} of {} chunks",
                                v["received"], v["chunks"]
                            );
                        }
                        streamed = true;
                        resend = false;
                        if resume {
                            for n in v["missing"]
                                .as_array()
                                .into_iter()
                                .flatten()
                                .filter_map(serde_json::Value::as_u64)
                            {
                                send_chunk(n)?;
                            }
                        } else {
                            for n in 0..m.chunks() {
                                send_chunk(n)?;
                            }
                        }
                    }
                    _ => {}
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                // Quiet for a while: ask again where the device stands.
                if last_activity.elapsed() >= Duration::from_secs(5) {
                    offer()?;
                    resend = streamed;
                    last_activity = Instant::now();
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                bail!("the MQTT connection thread stopped")
            }
        }
    }
}
