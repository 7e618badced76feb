//! `edgeinfer-loadgen`: drives an MQTT inference service (edgeinfer or the Python baseline) with
//! simulated devices and measures what a device sees.
//!
//! Contract (the same for every service under test): device `d` publishes frame `n` to
//! `<prefix>/d<d>/in/<n>`; the service answers on `<prefix>/d<d>/out/<n>` (edgeinfer: `input =
//! "bench/+/in/+"`, `output = "bench/{1}/out/{2}"`). The sequence number travels in the topic,
//! so raw frames can be matched too.
//!
//! - `run`: open loop at a fixed rate per device, or closed loop with a window of outstanding
//!   frames per device (saturation); reports end-to-end latency percentiles, frames/s served,
//!   losses, and the service's RSS and CPU (from /proc/PID), as JSON and a table, with a
//!   progress line while it runs.
//! - `coldstart`: spawns the service command and measures spawn -> first result received.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use clap::{Parser, Subcommand, ValueEnum};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::{Value, json};

#[derive(Parser)]
#[command(name = "edgeinfer-loadgen", about = "Load generator for edgeinfer benchmarks")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Offer load and measure latency, throughput, losses, service RSS and CPU.
    Run(RunArgs),
    /// Measure process spawn -> first result published, for a service command.
    Coldstart(ColdArgs),
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum Format {
    Raw,
    Json,
}

#[derive(clap::Args, Clone)]
struct Common {
    /// Broker address.
    #[arg(long, default_value = "127.0.0.1:1883")]
    broker: String,
    /// Persistent sessions (clean_session = false): with a persistent broker, devices and the
    /// result subscriber ride out broker restarts (tools/soak.sh).
    #[arg(long)]
    persistent: bool,
    /// Fixture directory (tests/fixtures/models/<case>): model inputs come from its samples.
    #[arg(long)]
    fixture: PathBuf,
    #[arg(long, value_enum, default_value = "raw")]
    format: Format,
    /// Topic prefix.
    #[arg(long, default_value = "bench")]
    prefix: String,
    /// QoS for frames.
    #[arg(long, default_value_t = 1)]
    qos: u8,
}

#[derive(clap::Args)]
struct RunArgs {
    #[command(flatten)]
    common: Common,
    /// Simulated devices (one MQTT connection each).
    #[arg(long, default_value_t = 1)]
    devices: usize,
    /// Open loop: frames per second per device.
    #[arg(long, conflicts_with = "window")]
    rate: Option<f64>,
    /// Closed loop: frames outstanding per device (measures saturation throughput).
    #[arg(long)]
    window: Option<usize>,
    /// How long to offer load.
    #[arg(long, default_value = "10s", value_parser = edgeinfer::cli::parse_duration_arg)]
    duration: Duration,
    /// Results not back this long after sending count as lost.
    #[arg(long, default_value = "5s", value_parser = edgeinfer::cli::parse_duration_arg)]
    timeout: Duration,
    /// Process to sample RSS and CPU from (the service under test).
    #[arg(long)]
    pid: Option<i32>,
    /// Label for reports.
    #[arg(long, default_value = "run")]
    label: String,
    /// Write the report (JSON) here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Also write every latency sample (µs) here, for plots.
    #[arg(long)]
    samples: Option<PathBuf>,
    /// No progress line.
    #[arg(long)]
    quiet: bool,
}

#[derive(clap::Args)]
struct ColdArgs {
    #[command(flatten)]
    common: Common,
    /// Repetitions (the median is reported).
    #[arg(long, default_value_t = 5)]
    repeat: usize,
    /// Give up on one start after this long.
    #[arg(long, default_value = "60s", value_parser = edgeinfer::cli::parse_duration_arg)]
    limit: Duration,
    #[arg(long, default_value = "coldstart")]
    label: String,
    #[arg(long)]
    json: Option<PathBuf>,
    /// The service command, after `--`.
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

fn qos(q: u8) -> QoS {
    match q {
        0 => QoS::AtMostOnce,
        2 => QoS::ExactlyOnce,
        _ => QoS::AtLeastOnce,
    }
}

/// Frame payloads from a fixture's samples, in the requested format.
fn payloads(fixture: &Path, format: Format) -> Result<Vec<Bytes>> {
    let meta: Value =
        serde_json::from_slice(&std::fs::read(fixture.join("meta.json")).context("meta.json")?)?;
    let inputs = meta["inputs"].as_array().context("inputs")?;
    if inputs.len() != 1 {
        bail!(
            "the load generator drives single-input models; {} has {}",
            fixture.display(),
            inputs.len()
        );
    }
    let name = inputs[0]["name"].as_str().context("input name")?;
    if inputs[0]["dtype"] != "f32" {
        bail!("only f32 inputs are supported");
    }
    let n = meta["samples"].as_u64().context("samples")? as usize;
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let raw = std::fs::read(fixture.join(format!("samples/{i:03}/input.{name}.bin")))?;
        out.push(match format {
            Format::Raw => Bytes::from(raw),
            Format::Json => {
                let data: Vec<f32> = raw
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect();
                Bytes::from(json!({"data": data}).to_string())
            }
        });
    }
    Ok(out)
}

fn connect(broker: &str, id: &str, clean: bool) -> Result<(AsyncClient, rumqttc::EventLoop)> {
    let (host, port) = broker.rsplit_once(':').context("--broker HOST:PORT")?;
    let mut o = MqttOptions::new(id, host, port.parse::<u16>()?);
    o.set_keep_alive(Duration::from_secs(30));
    o.set_max_packet_size(64 << 20, 64 << 20);
    o.set_inflight(1000);
    o.set_clean_session(clean);
    let (c, mut el) = AsyncClient::new(o, 10_000);
    el.network_options.set_tcp_nodelay(true);
    Ok((c, el))
}

/// Parses `<prefix>/d<dev>/out/<seq>`.
fn parse_out(topic: &str) -> Option<(usize, u64)> {
    let mut it = topic.rsplit('/');
    let seq = it.next()?.parse().ok()?;
    if it.next()? != "out" {
        return None;
    }
    let dev = it.next()?.strip_prefix('d')?.parse().ok()?;
    Some((dev, seq))
}

/// CPU seconds (user + system) and RSS bytes of a process.
fn proc_sample(pid: i32) -> Option<(f64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 and 15 (utime, stime) are at 11 and 12 after the `(comm)`.
    let ticks = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).ok()??.max(1) as f64;
    let rss = edgeinfer_rss(pid)?;
    Some((ticks as f64 / hz, rss))
}

fn edgeinfer_rss(pid: i32) -> Option<u64> {
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE).ok()?? as u64;
    Some(pages * page)
}

fn percentile(sorted: &[u64], q: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// The timing a service reports in its result (edgeinfer and the baseline both do).
#[derive(serde::Deserialize)]
struct Reported {
    timing_us: Option<Timing>,
}

#[derive(serde::Deserialize)]
struct Timing {
    inference: u64,
    total: u64,
}

/// Shared state of a run.
struct State {
    sent: Mutex<HashMap<(usize, u64), Instant>>,
    latencies_us: Mutex<Vec<u64>>,
    /// In-service time around inference (reported total - reported inference), per result.
    overhead_us: Mutex<Vec<u64>>,
    sent_count: AtomicU64,
    received: AtomicU64,
    lost: AtomicU64,
    unexpected: AtomicU64,
    stop: AtomicBool,
    permits: Vec<Arc<tokio::sync::Semaphore>>,
}

async fn run(a: RunArgs) -> Result<()> {
    if a.rate.is_none() && a.window.is_none() {
        bail!("give --rate (open loop) or --window (closed loop)");
    }
    let frames = payloads(&a.common.fixture, a.common.format)?;
    let q = qos(a.common.qos);
    let prefix = a.common.prefix.clone();
    let window = a.window.unwrap_or(0);
    let state = Arc::new(State {
        sent: Mutex::new(HashMap::with_capacity(4096)),
        latencies_us: Mutex::new(Vec::with_capacity(100_000)),
        overhead_us: Mutex::new(Vec::with_capacity(100_000)),
        sent_count: AtomicU64::new(0),
        received: AtomicU64::new(0),
        lost: AtomicU64::new(0),
        unexpected: AtomicU64::new(0),
        stop: AtomicBool::new(false),
        permits: (0..a.devices).map(|_| Arc::new(tokio::sync::Semaphore::new(window))).collect(),
    });

    // The result subscriber.
    let (sub, mut sub_el) = connect(
        &a.common.broker,
        &format!("loadgen-sub-{}", std::process::id()),
        !a.common.persistent,
    )?;
    sub.subscribe(format!("{prefix}/+/out/+"), QoS::AtLeastOnce).await?;
    let (subacked_tx, subacked_rx) = tokio::sync::oneshot::channel::<()>();
    let st = Arc::clone(&state);
    let reader = tokio::spawn(async move {
        let mut subacked = Some(subacked_tx);
        loop {
            match sub_el.poll().await {
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    if let Some(tx) = subacked.take() {
                        let _ = tx.send(());
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let now = Instant::now();
                    let Some(key) = parse_out(&p.topic) else {
                        st.unexpected.fetch_add(1, Ordering::Relaxed);
                        continue;
                    };
                    let sent = st.sent.lock().map(|mut m| m.remove(&key)).unwrap_or(None);
                    match sent {
                        Some(t) => {
                            let us = now.duration_since(t).as_micros() as u64;
                            if let Ok(mut l) = st.latencies_us.lock() {
                                l.push(us);
                            }
                            if let Ok(Reported { timing_us: Some(t) }) =
                                serde_json::from_slice::<Reported>(&p.payload)
                                && let Ok(mut o) = st.overhead_us.lock()
                            {
                                o.push(t.total.saturating_sub(t.inference));
                            }
                            st.received.fetch_add(1, Ordering::Relaxed);
                            if let Some(p) = st.permits.get(key.0) {
                                p.add_permits(1);
                            }
                        }
                        // Late (already counted lost) or duplicate.
                        None => {
                            st.unexpected.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    if st.stop.load(Ordering::Relaxed) {
                        break;
                    }
                    eprintln!("loadgen: subscriber connection: {e}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(10), subacked_rx).await.context("no SUBACK")??;

    let proc_start = a.pid.and_then(proc_sample);
    let max_rss = Arc::new(AtomicU64::new(proc_start.map_or(0, |s| s.1)));
    let started = Instant::now();
    let deadline = started + a.duration;

    // Devices.
    let mut devices = Vec::new();
    for d in 0..a.devices {
        let (client, mut el) = connect(
            &a.common.broker,
            &format!("loadgen-d{d}-{}", std::process::id()),
            !a.common.persistent,
        )?;
        tokio::spawn(async move {
            loop {
                if el.poll().await.is_err() {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        });
        let (st, frames, prefix, rate) =
            (Arc::clone(&state), frames.clone(), prefix.clone(), a.rate);
        let n_devices = a.devices;
        devices.push(tokio::spawn(async move {
            let mut seq = 0u64;
            let mut tick = rate.map(|r| {
                // Periodic sensors with their phases spread evenly: device d starts d/N of a
                // period late, so N devices do not all fire at the same instant.
                let period = Duration::from_secs_f64(1.0 / r);
                let offset = period.mul_f64(d as f64 / n_devices as f64);
                let mut i = tokio::time::interval_at(tokio::time::Instant::now() + offset, period);
                // Open loop: a late tick is made up for, so the offered rate holds.
                i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
                i
            });
            while Instant::now() < deadline && !st.stop.load(Ordering::Relaxed) {
                match tick.as_mut() {
                    Some(t) => {
                        t.tick().await;
                    }
                    None => match tokio::time::timeout_at(deadline.into(), st.permits[d].acquire())
                        .await
                    {
                        Ok(Ok(p)) => p.forget(),
                        _ => break,
                    },
                }
                let payload = frames[(d + seq as usize) % frames.len()].clone();
                if let Ok(mut m) = st.sent.lock() {
                    m.insert((d, seq), Instant::now());
                }
                if client
                    .publish(format!("{prefix}/d{d}/in/{seq}"), q, false, payload)
                    .await
                    .is_err()
                {
                    break;
                }
                st.sent_count.fetch_add(1, Ordering::Relaxed);
                seq += 1;
            }
            // Let queued publishes reach the broker.
            tokio::time::sleep(Duration::from_millis(100)).await;
            let _ = client.disconnect().await;
        }));
    }

    // Reaper: results not back within the timeout are lost; their window slot is returned.
    let st = Arc::clone(&state);
    let timeout = a.timeout;
    let reaper = tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let now = Instant::now();
            let expired: Vec<(usize, u64)> = st
                .sent
                .lock()
                .map(|m| {
                    m.iter()
                        .filter(|(_, t)| now.duration_since(**t) > timeout)
                        .map(|(k, _)| *k)
                        .collect()
                })
                .unwrap_or_default();
            for k in expired {
                if st.sent.lock().map(|mut m| m.remove(&k)).ok().flatten().is_some() {
                    st.lost.fetch_add(1, Ordering::Relaxed);
                    if let Some(p) = st.permits.get(k.0) {
                        p.add_permits(1);
                    }
                }
            }
        }
    });

    // Progress and RSS sampling.
    let mut last = (Instant::now(), 0u64);
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let mut n = 0u64;
    while Instant::now() < deadline {
        tick.tick().await;
        if let Some((_, rss)) = a.pid.and_then(proc_sample) {
            max_rss.fetch_max(rss, Ordering::Relaxed);
        }
        n += 1;
        if !a.quiet && n.is_multiple_of(4) {
            let recv = state.received.load(Ordering::Relaxed);
            let rate = (recv - last.1) as f64 / last.0.elapsed().as_secs_f64();
            last = (Instant::now(), recv);
            let p99 = state.latencies_us.lock().map(|l| {
                let mut tail: Vec<u64> = l.iter().rev().take(2000).copied().collect();
                tail.sort_unstable();
                percentile(&tail, 0.99)
            });
            eprintln!(
                "[{:>5.1}s] {}: sent {} recv {} ({rate:.1}/s) lost {} p99(recent) {}us",
                started.elapsed().as_secs_f64(),
                a.label,
                state.sent_count.load(Ordering::Relaxed),
                recv,
                state.lost.load(Ordering::Relaxed),
                p99.unwrap_or(0)
            );
        }
    }
    for d in devices {
        let _ = d.await;
    }
    let offered_for = started.elapsed();
    // Stragglers: wait until everything is answered or timed out.
    let wait = Instant::now();
    while state.sent.lock().map(|m| !m.is_empty()).unwrap_or(false)
        && wait.elapsed() < a.timeout + Duration::from_millis(500)
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let proc_end = a.pid.and_then(proc_sample);
    state.stop.store(true, Ordering::Relaxed);
    reaper.abort();
    let _ = sub.disconnect().await;
    let _ = tokio::time::timeout(Duration::from_secs(1), reader).await;

    let mut lat = state.latencies_us.lock().map(|l| l.clone()).unwrap_or_default();
    lat.sort_unstable();
    let mut ovh = state.overhead_us.lock().map(|l| l.clone()).unwrap_or_default();
    ovh.sort_unstable();
    let sent = state.sent_count.load(Ordering::Relaxed);
    let received = state.received.load(Ordering::Relaxed);
    let lost = sent.saturating_sub(received);
    let secs = offered_for.as_secs_f64();
    let cpu = match (proc_start, proc_end) {
        (Some(s), Some(e)) => Some(e.0 - s.0),
        _ => None,
    };
    let report = json!({
        "label": a.label,
        "mode": if a.rate.is_some() { "open" } else { "closed" },
        "devices": a.devices,
        "rate_per_device": a.rate,
        "window": a.window,
        "format": if a.common.format == Format::Raw { "raw" } else { "json" },
        "duration_s": secs,
        "sent": sent,
        "received": received,
        "lost": lost,
        "unexpected": state.unexpected.load(Ordering::Relaxed),
        "offered_fps": sent as f64 / secs,
        "served_fps": received as f64 / secs,
        "latency_us": {
            "p50": percentile(&lat, 0.50), "p90": percentile(&lat, 0.90), "p99": percentile(&lat, 0.99),
            "p999": percentile(&lat, 0.999), "max": lat.last().copied().unwrap_or(0),
            "mean": if lat.is_empty() { 0.0 } else { lat.iter().sum::<u64>() as f64 / lat.len() as f64 },
        },
        "service_overhead_us": {
            "note": "reported by the service: total - inference (queueing, decoding, serialization)",
            "samples": ovh.len(),
            "p50": percentile(&ovh, 0.50), "p99": percentile(&ovh, 0.99), "max": ovh.last().copied().unwrap_or(0),
        },
        "service": a.pid.map(|pid| json!({
            "pid": pid,
            "rss_start_bytes": proc_start.map(|s| s.1),
            "rss_end_bytes": proc_end.map(|s| s.1),
            "rss_max_bytes": max_rss.load(Ordering::Relaxed),
            "cpu_seconds": cpu,
            "cpu_utilization": cpu.map(|c| c / secs),
        })),
    });
    print_table(&report);
    if let Some(path) = &a.json {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)?;
    }
    if let Some(path) = &a.samples {
        std::fs::write(path, serde_json::to_vec(&lat)?)?;
    }
    Ok(())
}

fn print_table(r: &Value) {
    let l = &r["latency_us"];
    println!(
        "{:<28} {:>8} {:>8} {:>6} {:>9} {:>8} {:>8} {:>8} {:>9} {:>9} {:>10} {:>6}",
        "label",
        "sent",
        "recv",
        "lost",
        "served/s",
        "p50 us",
        "p90 us",
        "p99 us",
        "p99.9 us",
        "max us",
        "rss MiB",
        "cpu%"
    );
    let svc = &r["service"];
    println!(
        "{:<28} {:>8} {:>8} {:>6} {:>9.1} {:>8} {:>8} {:>8} {:>9} {:>9} {:>10} {:>6}",
        r["label"].as_str().unwrap_or(""),
        r["sent"],
        r["received"],
        r["lost"],
        r["served_fps"].as_f64().unwrap_or(0.0),
        l["p50"],
        l["p90"],
        l["p99"],
        l["p999"],
        l["max"],
        svc["rss_max_bytes"].as_f64().map_or("-".into(), |b| format!("{:.1}", b / 1048576.0)),
        svc["cpu_utilization"].as_f64().map_or("-".into(), |c| format!("{:.0}", c * 100.0)),
    );
}

async fn coldstart(a: ColdArgs) -> Result<()> {
    let frames = payloads(&a.common.fixture, a.common.format)?;
    let prefix = a.common.prefix.clone();
    let mut times_ms = Vec::new();
    for rep in 0..a.repeat {
        let (sub, mut sub_el) =
            connect(&a.common.broker, &format!("cold-sub-{}-{rep}", std::process::id()), true)?;
        sub.subscribe(format!("{prefix}/+/out/+"), QoS::AtMostOnce).await?;
        let (pubc, mut pub_el) =
            connect(&a.common.broker, &format!("cold-pub-{}-{rep}", std::process::id()), true)?;
        let driver = tokio::spawn(async move {
            loop {
                if pub_el.poll().await.is_err() {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        });
        // Wait for our own SUBACK before starting the clock.
        loop {
            if let Ok(Event::Incoming(Packet::SubAck(_))) = sub_el.poll().await {
                break;
            }
        }
        let t0 = Instant::now();
        let mut child = Command::new(&a.command[0])
            .args(&a.command[1..])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("spawning {:?}", a.command))?;
        let got = Arc::new(AtomicBool::new(false));
        let (g, pc, frame, pf) =
            (Arc::clone(&got), pubc.clone(), frames[0].clone(), prefix.clone());
        // Keep offering frames until the service answers (frames sent before it subscribed are
        // simply not delivered). Paced by size (about 20 MB/s, every 2 to 50 ms) so a flood of
        // large frames does not itself delay the first answer; the pace bounds the resolution.
        let pace = Duration::from_secs_f64(frame.len() as f64 / 20e6)
            .clamp(Duration::from_millis(2), Duration::from_millis(50));
        let offer = tokio::spawn(async move {
            let mut seq = 0u64;
            while !g.load(Ordering::Relaxed) {
                let _ = pc.try_publish(
                    format!("{pf}/d0/in/{seq}"),
                    QoS::AtMostOnce,
                    false,
                    frame.clone(),
                );
                seq += 1;
                tokio::time::sleep(pace).await;
            }
        });
        let first = tokio::time::timeout(a.limit, async {
            loop {
                if let Ok(Event::Incoming(Packet::Publish(p))) = sub_el.poll().await
                    && parse_out(&p.topic).is_some()
                {
                    return t0.elapsed();
                }
            }
        })
        .await;
        got.store(true, Ordering::Relaxed);
        let _ = offer.await;
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = child.wait();
        driver.abort();
        let _ = sub.disconnect().await;
        match first {
            Ok(d) => {
                eprintln!(
                    "{}: start {rep}: first result after {:.1} ms",
                    a.label,
                    d.as_secs_f64() * 1000.0
                );
                times_ms.push(d.as_secs_f64() * 1000.0);
            }
            Err(_) => {
                bail!("{}: no result within {:?} of spawning {:?}", a.label, a.limit, a.command)
            }
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    times_ms.sort_by(f64::total_cmp);
    let report = json!({
        "label": a.label,
        "repeat": a.repeat,
        "spawn_to_first_result_ms": {
            "median": times_ms[times_ms.len() / 2],
            "min": times_ms[0],
            "max": times_ms[times_ms.len() - 1],
            "all": times_ms,
        },
    });
    println!("{}: spawn -> first result median {:.1} ms", a.label, times_ms[times_ms.len() / 2]);
    if let Some(path) = &a.json {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)?;
    }
    Ok(())
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(async {
        match cli.cmd {
            Cmd::Run(a) => run(a).await,
            Cmd::Coldstart(a) => coldstart(a).await,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn result_topics_parse() {
        assert_eq!(parse_out("bench/d3/out/17"), Some((3, 17)));
        assert_eq!(parse_out("x/y/bench/d0/out/0"), Some((0, 0)));
        assert_eq!(parse_out("bench/d3/in/17"), None);
        assert_eq!(parse_out("bench/x3/out/17"), None);
    }

    #[test]
    fn percentiles_by_nearest_rank() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 0.5), 50);
        assert_eq!(percentile(&v, 0.99), 99);
        assert_eq!(percentile(&v, 1.0), 100);
        assert_eq!(percentile(&[], 0.5), 0);
    }
}
