//! `edgeinfer-ota`: key generation, and signed, resumable model delivery to an edgeinfer device
//! over MQTT (protocol: `daemon/src/ota.rs`, `docs/models.md`).
//!
//!   edgeinfer-ota keygen --out fleet.key [--id fleet-2026]
//!   edgeinfer-ota push --broker 127.0.0.1:1883 --device edge-01 --pipeline digits \
//!       --model digits-v2.onnx --version 2 --release 42 --key fleet.key --key-id fleet-2026
//!
//! `push` publishes the signed manifest (for `--target`, the device id by default, valid for
//! `--expires-in`), streams the chunks, and then follows the device's status: chunks the device
//! reports missing (after a lost connection, a broker restart or a device restart) are sent
//! again, and the manifest is re-published after a reconnect so the device says where it
//! stands. `--release` must exceed every release the device accepted for the pipeline; a
//! downgrade needs `--force`, which first asks the device for its nonce (a refused offer's
//! answer carries it) and signs it into the manifest. It exits 0 once the device reports
//! `installed`, 1 on `rejected` (with the reason), 2 when it gives up.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use base64::Engine;
use clap::{Parser, Subcommand};
use ed25519_dalek::SigningKey;
use edgeinfer::ota::Manifest;
use rumqttc::{Client, Event, MqttOptions, Packet, QoS};

#[derive(Parser)]
#[command(version, about = "Sign and deliver models to edgeinfer devices over MQTT")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

// Parsed once at start-up: the size difference between the variants costs nothing.
#[allow(clippy::large_enum_variant)]
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
        /// A label for people (the model's own version is what health reports).
        #[arg(long)]
        version: String,
        /// Release number, above every release the device accepted for this pipeline (a build
        /// number or a timestamp: anything that only grows).
        #[arg(long)]
        release: u64,
        /// Who may install it: the device id (default) or a group from the devices'
        /// `ota.groups`.
        #[arg(long)]
        target: Option<String>,
        /// How long the signed manifest stays valid, e.g. 24h, 30m, 7d.
        #[arg(long, default_value = "24h")]
        expires_in: String,
        /// Private key file from `keygen`.
        #[arg(long)]
        key: PathBuf,
        #[arg(long, default_value = "fleet")]
        key_id: String,
        #[arg(long, default_value_t = 65536)]
        chunk_size: u64,
        /// Allow a release that is not above the accepted one (a downgrade): the device's
        /// current nonce is fetched and signed into the manifest, so it works once.
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
            release,
            target,
            expires_in,
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
            let expires = edgeinfer::ota::unix_now() + parse_duration(&expires_in)?;
            let mut m = Manifest::for_file(
                &pipeline,
                &version,
                release,
                target.as_deref().unwrap_or(&device),
                expires,
                &bytes,
                chunk_size,
                &key_id,
            );
            m.force = force;
            m.sign(&sk);
            push(&broker, &base, m, &bytes, &sk, Duration::from_secs(timeout))
        }
    }
}

/// `30s`, `30m`, `24h`, `7d` as seconds.
fn parse_duration(s: &str) -> Result<u64> {
    let (n, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = n.parse().with_context(|| format!("--expires-in {s:?}: expected e.g. 24h"))?;
    let mul = match unit {
        "s" => 1,
        "m" => 60,
        "h" | "" => 3600,
        "d" => 86400,
        _ => bail!("--expires-in {s:?}: the unit is s, m, h or d"),
    };
    Ok(n * mul)
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

fn push(
    broker: &str,
    base: &str,
    mut m: Manifest,
    bytes: &[u8],
    sk: &SigningKey,
    timeout: Duration,
) -> Result<u8> {
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
    let mut manifest = serde_json::to_vec(&m)?;
    let (pipeline, chunk_size) = (m.pipeline.clone(), m.chunk_size);
    let send_chunk = |n: u64| -> Result<()> {
        let s = (n * chunk_size) as usize;
        let e = (s + chunk_size as usize).min(bytes.len());
        client.publish(
            format!("{base}/{pipeline}/chunk/{n}"),
            QoS::AtLeastOnce,
            false,
            bytes[s..e].to_vec(),
        )?;
        Ok(())
    };
    // Offers the manifest; the device answers with a status saying what it has.
    let offer = |manifest: &Vec<u8>| {
        client.publish(
            format!("{base}/{pipeline}/manifest"),
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
                offer(&manifest)?;
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
                    "rejected"
                        if m.force
                            && !streamed
                            && m.nonce.is_empty()
                            && v["nonce"].as_str().is_some_and(|n| !n.is_empty()) =>
                    {
                        // A forced offer is answered with the device's nonce: sign it in and
                        // offer again (the nonce works once).
                        m.nonce = v["nonce"].as_str().unwrap_or_default().to_string();
                        m.sign(sk);
                        manifest = serde_json::to_vec(&m)?;
                        eprintln!("forced: signing the device's nonce into the manifest");
                        offer(&manifest)?;
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
                    offer(&manifest)?;
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
