//! `edgeinfer demo`: the whole product on one machine in one command.
//!
//! Starts an in-process MQTT broker (rumqttd) on a free loopback port, the daemon on the bundled
//! digits classifier (an MLP trained on scikit-learn's `load_digits`, see `assets/demo/`), and
//! simulated sensors that publish held-out test images as JSON frames. A subscriber prints live
//! results, throughput and accuracy against the true labels, then everything shuts down cleanly
//! through the daemon's normal drain path. Compiled only with the `demo` feature (the device
//! build leaves the broker out).

use std::collections::HashMap;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

use crate::app::{self, StopHandle};
use crate::config::Config;
use crate::config::units::parse_duration;
use crate::exit::{EX_FAILURE, report};

const MODEL: &[u8] = include_bytes!("../assets/demo/digits.onnx");
const LABELS: &str = include_str!("../assets/demo/labels.txt");
const SAMPLES: &[u8] = include_bytes!("../assets/demo/samples.f32");
const SAMPLE_LABELS: &[u8] = include_bytes!("../assets/demo/samples.labels");
const PIXELS: usize = 64;

#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// How long the sensors publish.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Simulated sensor devices.
    #[arg(long, default_value_t = 4)]
    pub devices: usize,
    /// Frames per second per device.
    #[arg(long, default_value_t = 25.0)]
    pub rate: f64,
    /// Print every result instead of one per device per second.
    #[arg(long)]
    pub verbose: bool,
}

fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The in-process broker. rumqttd has no shutdown API: it lives until the process exits.
fn start_broker(port: u16) -> Result<(), String> {
    let cfg = format!(
        r#"
id = 0
[router]
id = 0
max_connections = 64
max_outgoing_packet_count = 200
max_segment_size = 10485760
max_segment_count = 10
[v4.1]
name = "demo"
listen = "127.0.0.1:{port}"
next_connection_delay_ms = 1
[v4.1.connections]
connection_timeout_ms = 60000
max_payload_size = 1048576
max_inflight_count = 200
dynamic_filters = true
"#
    );
    let config: rumqttd::Config =
        toml::from_str(&cfg).map_err(|e| format!("broker config: {e}"))?;
    let mut broker = rumqttd::Broker::new(config);
    std::thread::Builder::new()
        .name("demo-broker".into())
        .spawn(move || {
            if let Err(e) = broker.start() {
                log::error!("demo broker stopped: {e}");
            }
        })
        .map_err(|e| e.to_string())?;
    // Wait until it accepts connections.
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            return Err(format!("demo broker did not start listening on 127.0.0.1:{port}"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

fn demo_config(port: u16, dir: &std::path::Path) -> Result<Config, String> {
    let text = format!(
        r#"
device_id = "demo"
[broker]
port = {port}
client_id = "edgeinfer-demo"
clean_session = true
[health]
interval = "2s"
[metrics]
interval = "0s"
[shutdown]
grace = "5s"
[system]
# The demo is a developer tool run from a shell: no service user, no delegated cgroup.
allow_root = true
[system.cgroup]
mode = "off"
[pipelines.digits]
model = "digits.onnx"
input = "demo/sensors/+/digits"
output = "edgeinfer/{{device}}/results/{{pipeline}}/{{1}}"
format = "json"
qos = 1
[pipelines.digits.queue]
capacity = 64
[pipelines.digits.postprocess]
kind = "classification"
top_k = 3
labels = "labels.txt"
include_outputs = false
"#
    );
    Config::parse_str(&text, "demo config", Some(dir)).map_err(|e| e.to_string())
}

struct Tally {
    published: AtomicU64,
    results: AtomicU64,
    correct: AtomicU64,
}

pub fn run(args: &DemoArgs) -> ExitCode {
    match run_inner(args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(EX_FAILURE),
        Err(e) => {
            eprintln!("error: demo: {e}");
            ExitCode::from(EX_FAILURE)
        }
    }
}

fn run_inner(args: &DemoArgs) -> Result<bool, String> {
    if args.devices == 0 || args.rate <= 0.0 || !args.rate.is_finite() {
        return Err("--devices and --rate must be positive".into());
    }
    let samples = SAMPLES.len() / (PIXELS * 4);
    let dir = std::env::temp_dir().join(format!("edgeinfer-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let _cleanup = RemoveOnDrop(dir.clone());
    std::fs::write(dir.join("digits.onnx"), MODEL).map_err(|e| e.to_string())?;
    std::fs::write(dir.join("labels.txt"), LABELS).map_err(|e| e.to_string())?;

    let port = free_port().map_err(|e| format!("no free port: {e}"))?;
    start_broker(port)?;
    println!("demo: in-process MQTT broker on 127.0.0.1:{port}");
    let config = demo_config(port, &dir)?;

    // The demo's own runtime first: the daemon's start-up pins the calling thread (and the
    // threads it creates later) to its I/O CPU, which the simulated sensors should not share.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("demo-io")
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    // The daemon, exactly as `edgeinfer run` starts it, on its own thread.
    let stop = StopHandle::default();
    let app = app::start(config).map_err(|e| {
        report(&e);
        "daemon start-up failed".to_string()
    })?;
    let stop2 = stop.clone();
    let daemon = std::thread::Builder::new()
        .name("demo-daemon".into())
        .spawn(move || app.serve(stop2))
        .map_err(|e| e.to_string())?;

    let tally = Arc::new(Tally {
        published: AtomicU64::new(0),
        results: AtomicU64::new(0),
        correct: AtomicU64::new(0),
    });
    let running = Arc::new(AtomicBool::new(true));
    println!(
        "demo: {} sensors x {} frames/s of 8x8 handwritten digits ({} held-out images) for {:?}",
        args.devices, args.rate, samples, args.duration
    );

    let ok = rt.block_on(async {
        let observer = tokio::spawn(observe(port, Arc::clone(&tally), args.devices, args.verbose));
        // Give the daemon and observer a moment to subscribe before sensors start.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let mut sensors = Vec::new();
        for d in 0..args.devices {
            sensors.push(tokio::spawn(sensor(port, d, args.rate, samples, Arc::clone(&tally), Arc::clone(&running))));
        }
        let started = Instant::now();
        let mut last = (Instant::now(), 0u64);
        while started.elapsed() < args.duration && !daemon.is_finished() {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let n = tally.results.load(Ordering::Relaxed);
            let c = tally.correct.load(Ordering::Relaxed);
            let rate = (n - last.1) as f64 / last.0.elapsed().as_secs_f64();
            last = (Instant::now(), n);
            println!(
                "[{:>4.1}s] {:>6.1} results/s | published {} | results {} | accuracy {:.1}%",
                started.elapsed().as_secs_f64(),
                rate,
                tally.published.load(Ordering::Relaxed),
                n,
                if n > 0 { 100.0 * c as f64 / n as f64 } else { 0.0 }
            );
        }
        running.store(false, Ordering::Relaxed);
        for s in sensors {
            let _ = s.await;
        }
        // Let the last results arrive, then stop the daemon through its normal drain.
        let wait = Instant::now();
        while tally.results.load(Ordering::Relaxed) < tally.published.load(Ordering::Relaxed)
            && wait.elapsed() < Duration::from_secs(3)
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let elapsed = started.elapsed();
        observer.abort();
        let n = tally.results.load(Ordering::Relaxed);
        let p = tally.published.load(Ordering::Relaxed);
        let c = tally.correct.load(Ordering::Relaxed);
        println!(
            "demo: {p} frames published, {n} results ({:.1} results/s), accuracy {:.1}% vs the true labels",
            n as f64 / elapsed.as_secs_f64(),
            if n > 0 { 100.0 * c as f64 / n as f64 } else { 0.0 }
        );
        n > 0
    });
    stop.stop();
    match daemon.join() {
        Ok(Ok(())) => println!("demo: daemon stopped cleanly"),
        Ok(Err(e)) => {
            report(&e);
            return Ok(false);
        }
        Err(_) => return Err("daemon thread panicked".into()),
    }
    rt.shutdown_timeout(Duration::from_millis(200));
    Ok(ok)
}

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn connect(port: u16, id: &str) -> (AsyncClient, rumqttc::EventLoop) {
    let mut o = MqttOptions::new(id, "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(10));
    o.set_max_packet_size(1 << 20, 1 << 20);
    AsyncClient::new(o, 256)
}

/// One simulated sensor: publishes test images in turn, `{seq, ts, data}` JSON, QoS 1.
async fn sensor(
    port: u16,
    device: usize,
    rate: f64,
    samples: usize,
    tally: Arc<Tally>,
    running: Arc<AtomicBool>,
) {
    let (client, mut el) = connect(port, &format!("demo-sensor-{device}"));
    let driver = tokio::spawn(async move {
        loop {
            if el.poll().await.is_err() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    });
    let topic = format!("demo/sensors/sensor-{device}/digits");
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    let mut seq = 0u64;
    while running.load(Ordering::Relaxed) {
        tick.tick().await;
        let idx = sample_index(device, seq, samples);
        let px: Vec<f32> = SAMPLES[idx * PIXELS * 4..(idx + 1) * PIXELS * 4]
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let ts =
            SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64() * 1000.0);
        let payload = serde_json::json!({"seq": seq, "ts": ts, "data": px}).to_string();
        if client.publish(topic.clone(), QoS::AtLeastOnce, false, payload).await.is_ok() {
            tally.published.fetch_add(1, Ordering::Relaxed);
        }
        seq += 1;
    }
    // Let queued publishes reach the broker before dropping the connection.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let _ = client.disconnect().await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    driver.abort();
}

/// Which held-out image device `d` sends as frame `seq` (devices start at different offsets).
fn sample_index(device: usize, seq: u64, samples: usize) -> usize {
    (device * 97 + seq as usize) % samples
}

/// Subscribes to the results and prints them as they arrive.
async fn observe(port: u16, tally: Arc<Tally>, devices: usize, verbose: bool) {
    let (client, mut el) = connect(port, "demo-observer");
    let samples = SAMPLES.len() / (PIXELS * 4);
    let _ = client.subscribe("edgeinfer/demo/results/#", QoS::AtLeastOnce).await;
    let _ = client.subscribe("edgeinfer/demo/errors/#", QoS::AtMostOnce).await;
    let mut last_print: HashMap<String, Instant> = HashMap::with_capacity(devices);
    loop {
        let p = match el.poll().await {
            Ok(Event::Incoming(Packet::Publish(p))) => p,
            Ok(_) => continue,
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(&p.payload) else { continue };
        if p.topic.starts_with("edgeinfer/demo/errors/") {
            println!("  error: {}", v["detail"].as_str().unwrap_or("?"));
            continue;
        }
        let device = p.topic.rsplit('/').next().unwrap_or("?").to_string();
        let dev_idx: usize = device.trim_start_matches("sensor-").parse().unwrap_or(0);
        let seq = v["seq"].as_u64().unwrap_or(0);
        let truth = SAMPLE_LABELS.get(sample_index(dev_idx, seq, samples)).copied().unwrap_or(255);
        let best = &v["top_k"][0];
        let predicted = best["label"].as_str().unwrap_or("?").to_string();
        let correct = predicted == truth.to_string();
        tally.results.fetch_add(1, Ordering::Relaxed);
        if correct {
            tally.correct.fetch_add(1, Ordering::Relaxed);
        }
        let due = last_print.get(&device).is_none_or(|t| t.elapsed() >= Duration::from_secs(1));
        if verbose || due {
            last_print.insert(device.clone(), Instant::now());
            println!(
                "  {device:<9} seq={seq:<5} -> digit {predicted} (p={:.3}) true={truth} {}  inference {}us, total {}us",
                best["score"].as_f64().unwrap_or(0.0),
                if correct { "ok" } else { "MISS" },
                v["timing_us"]["inference"],
                v["timing_us"]["total"]
            );
        }
    }
}
