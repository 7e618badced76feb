//! Delivery under faults (fault injection: a TCP proxy that cuts, resets, stalls, slows and
//! refuses the daemon's broker connection; broker kills and restarts): every frame a device
//! publishes gets exactly one result, and results produced while the broker is unreachable wait
//! in the on-disk spool, across a daemon restart.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, Instant};

use edgeinfer_tests::{
    Daemon, FaultProxy, Fixture, Mosquitto, MqttClient, config, eventually, wait_health,
    wait_online,
};
use nix::sys::signal::Signal;
use rumqttc::QoS;
use serde_json::Value;

fn with_state_dir(cfg: String, dir: &Path) -> String {
    cfg.replace("[system]\n", &format!("[system]\nstate_dir = {:?}\n", dir.display().to_string()))
}

/// The distinct payloads delivered for one frame, and the number of deliveries.
type Delivered = (BTreeSet<Vec<u8>>, usize);

fn seq_of(v: &Value) -> u64 {
    v["seq"].as_u64().unwrap_or(u64::MAX)
}

/// The two spool tests' set-up: a daemon serving the slow fixture (~20 ms a frame) with a state
/// directory and `extra` config, online on a fresh broker.
struct SlowRig {
    fx: Fixture,
    state: tempfile::TempDir,
    broker: Mosquitto,
    cfg: String,
    daemon: Daemon,
}

impl SlowRig {
    fn start(device: &str, extra: &str) -> Self {
        let fx = Fixture::load("slow").expect("fixture");
        let state = tempfile::tempdir().expect("tmp");
        let broker = Mosquitto::start().expect("mosquitto");
        let pipeline = fx.pipeline(
            "slow",
            "s/+",
            "r/{1}",
            "format = \"raw\"\n[pipelines.slow.queue]\ncapacity = 500",
        );
        let cfg = with_state_dir(config(broker.port, device, &pipeline), state.path()) + extra;
        let daemon = Daemon::start(&cfg).expect("daemon");
        wait_online(broker.port, device);
        SlowRig { fx, state, broker, cfg, daemon }
    }

    /// Publishes `n` frames from `dev` (topics `s/<i>`) and waits until the broker took them all.
    fn publish(&self, dev: &MqttClient, n: usize) {
        for i in 0..n {
            dev.publish(
                &format!("s/{i}"),
                self.fx.samples[i % 2].inputs["x"].clone(),
                QoS::AtLeastOnce,
                false,
            )
            .expect("publish");
        }
        assert!(
            eventually(Duration::from_secs(30), || dev.pubacks() >= n as u64),
            "frames not all accepted by the broker"
        );
    }

    /// Fault injection: the broker dies with frames still queued in the daemon, which then
    /// announces that results go to the spool.
    fn kill_broker(&mut self) {
        std::thread::sleep(Duration::from_millis(300));
        self.broker.kill();
        self.daemon.wait_log("results go to", Duration::from_secs(30)).expect("spooling announced");
    }
}

/// Frames queued behind a slow model when the broker dies are served while it is down; their
/// results go to the spool, are written to disk when the daemon stops, and are published in
/// order by the next daemon on a fresh broker that knows nothing of the old session.
#[test]
fn results_survive_a_broker_outage_and_a_daemon_restart_in_the_spool() {
    let mut rig = SlowRig::start("spool", "");
    let obs = MqttClient::connect(rig.broker.port, "obs-spool").expect("observer");
    obs.subscribe("r/#").expect("subscribe");
    let dev = MqttClient::connect(rig.broker.port, "dev-spool").expect("device");
    let n = 120;
    rig.publish(&dev, n);
    // Every frame has been delivered to the daemon once its queue holds them all.
    let first = obs.recv(Duration::from_secs(30)).expect("first result");
    rig.kill_broker();
    let mut before: Vec<Value> = vec![first.json()];
    while let Some(m) = obs.recv(Duration::from_millis(200)) {
        before.push(m.json());
    }
    drop(obs);
    drop(dev);
    assert!(before.len() < n / 2, "the outage must catch queued frames ({} served)", before.len());
    // Let the daemon serve the queue into the spool, then stop it while the broker is down.
    let SlowRig { fx, state, mut broker, cfg, mut daemon } = rig;
    let spool_dir = state.path().join("spool");
    assert!(
        eventually(Duration::from_secs(60), || {
            std::fs::read_dir(&spool_dir).is_ok_and(|d| d.count() > 0)
        }),
        "nothing spooled\n{}",
        daemon.log()
    );
    daemon.signal(Signal::SIGTERM);
    let status = daemon.wait_exit(Duration::from_secs(60)).expect("exit");
    assert!(status.success(), "exit status {status:?}\n{}", daemon.log());

    // A fresh broker (no persistence: the daemon's old session is gone) and a new daemon with
    // the same state directory.
    broker.restart().expect("broker restart");
    let obs = MqttClient::connect(broker.port, "obs-spool-2").expect("observer");
    obs.subscribe("r/#").expect("subscribe");
    let mut daemon = Daemon::start(&cfg).expect("daemon again");
    let rest = n - before.len();
    let after: Vec<Value> = obs
        .collect_until(Duration::from_secs(60), |m| m.len() >= rest)
        .unwrap_or_else(|e| panic!("{e}\n{}", daemon.log()))
        .iter()
        .map(|m| m.json())
        .collect();
    // Nothing more arrives: no result is published twice.
    assert!(obs.recv(Duration::from_secs(2)).is_none(), "an extra result arrived");
    let mut count: BTreeMap<String, usize> = BTreeMap::new();
    for v in before.iter().chain(&after) {
        *count.entry(v["topic"].as_str().unwrap_or_default().to_string()).or_default() += 1;
    }
    assert_eq!(count.len(), n, "every frame has a result");
    assert!(count.values().all(|&c| c == 1), "each exactly once: {count:?}");
    // In the order they were produced: frame ids increase.
    let frames: Vec<u64> = after.iter().map(|v| v["frame"].as_u64().unwrap_or(0)).collect();
    assert!(frames.windows(2).all(|w| w[0] < w[1]), "flushed out of order: {frames:?}");
    for v in &after {
        let i: usize =
            v["topic"].as_str().unwrap_or("").trim_start_matches("s/").parse().expect("i");
        fx.check_result(i % 2, v).expect("reference outputs");
    }
    let h = wait_health(broker.port, "spool", Duration::from_secs(15), |v| {
        v["transport"]["spool"]["flushed"].as_u64() == Some(rest as u64)
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", daemon.log()));
    let sp = &h["transport"]["spool"];
    assert_eq!(sp["recovered"].as_u64(), Some(rest as u64), "{sp}");
    assert_eq!(sp["records"], 0, "{sp}");
    assert_eq!(sp["evicted"], 0, "{sp}");
    assert_eq!(sp["active"], false, "{sp}");
    daemon.signal(Signal::SIGTERM);
    assert!(daemon.wait_exit(Duration::from_secs(30)).expect("exit").success());
}

/// 60 seconds of frames from two devices while the daemon's connection is cut (FIN), reset
/// (RST), stalled past keep-alive, slowed to a trickle, refused for a while, and the broker is
/// restarted (persistent sessions): every frame gets exactly one result, checked by seq. With
/// QoS 1 a result whose PUBACK was lost in a cut is sent again; such a repeat is byte-identical
/// (same `frame` id and timings), which is how a consumer tells it from a second result.
#[test]
fn every_frame_gets_exactly_one_result_across_connection_faults() {
    let fx = Fixture::load("digits").expect("fixture");
    let state = tempfile::tempdir().expect("tmp");
    let mut broker = Mosquitto::start_persistent().expect("mosquitto");
    let proxy = FaultProxy::start(broker.port).expect("proxy");
    let device = "faults";
    let pipeline =
        fx.pipeline("digits", "s/+", "r/{1}", "[pipelines.digits.queue]\ncapacity = 2000");
    let cfg = with_state_dir(config(proxy.port, device, &pipeline), state.path())
        .replace("keepalive = \"10s\"", "keepalive = \"5s\"");
    let daemon = Daemon::start(&cfg).expect("daemon");
    wait_online(broker.port, device);
    let obs = MqttClient::connect_persistent(broker.port, "obs-faults").expect("observer");
    obs.subscribe_qos("r/#", QoS::AtLeastOnce).expect("subscribe");
    let devices: Vec<MqttClient> = (0..2)
        .map(|d| MqttClient::connect_persistent(broker.port, &format!("dev-faults-{d}")))
        .collect::<Result<_, _>>()
        .expect("devices");

    // The fault schedule runs beside the publishers: one fault every 8 s from t = 6 s.
    let run = Duration::from_secs(60);
    let start = Instant::now();
    let faults = std::thread::scope(|s| {
        let injector = s.spawn(|| {
            let mut log = Vec::new();
            let at = |t: u64| {
                let due = start + Duration::from_secs(t);
                std::thread::sleep(due.saturating_duration_since(Instant::now()));
            };
            at(6);
            proxy.cut();
            log.push("cut");
            at(14);
            proxy.reset();
            log.push("reset");
            at(22);
            proxy.stall(Duration::from_secs(12));
            log.push("stall 12s");
            at(38);
            proxy.slow(4096, Duration::from_secs(4));
            log.push("slow 4 KiB/s for 4s");
            at(44);
            proxy.outage(Duration::from_secs(3));
            log.push("refused for 3s");
            at(51);
            log
        });
        // 2 devices x 20 frames/s for 60 s; the broker restart happens on this thread at 51 s.
        let mut seq = 0u64;
        let mut restarted = false;
        while start.elapsed() < run {
            if !restarted && start.elapsed() >= Duration::from_secs(51) {
                // Fault injection: graceful broker restart (sessions persist).
                broker.restart_graceful().expect("broker restart");
                restarted = true;
            }
            for (d, dev) in devices.iter().enumerate() {
                dev.publish(
                    &format!("s/d{d}"),
                    fx.json_frame((seq % 2) as usize, seq),
                    QoS::AtLeastOnce,
                    false,
                )
                .expect("publish");
            }
            seq += 1;
            std::thread::sleep(Duration::from_millis(50));
        }
        let mut log = injector.join().expect("injector");
        log.push("broker restart");
        (log, seq)
    });
    let (fault_log, frames) = faults;
    let want = frames as usize * devices.len();
    // Per (device topic, seq): the distinct results delivered, and how many deliveries.
    let mut seen: BTreeMap<(String, u64), Delivered> = BTreeMap::new();
    let mut record = |m: &edgeinfer_tests::Msg| {
        let v = m.json();
        if let Err(e) = fx.check_result((seq_of(&v) % 2) as usize, &v) {
            panic!("wrong result {v}: {e}");
        }
        let e = seen.entry((m.topic.clone(), seq_of(&v))).or_default();
        e.0.insert(m.payload.to_vec());
        e.1 += 1;
    };
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut distinct = 0;
    while distinct < want && Instant::now() < deadline {
        if let Some(m) = obs.recv(Duration::from_millis(500)) {
            record(&m);
            distinct += 1;
        }
    }
    // Late repeats would arrive now.
    while let Some(m) = obs.recv(Duration::from_secs(3)) {
        record(&m);
    }
    let missing: Vec<(String, u64)> = (0..frames)
        .flat_map(|s| (0..devices.len()).map(move |d| (format!("r/d{d}"), s)))
        .filter(|k| !seen.contains_key(k))
        .collect();
    // Two different results for one frame would mean it was served twice.
    let served_twice: Vec<_> =
        seen.iter().filter(|(_, (p, _))| p.len() > 1).map(|(k, _)| k).collect();
    let repeats: usize = seen.values().map(|(p, n)| n - p.len()).sum();
    if !missing.is_empty() || !served_twice.is_empty() {
        let _ = std::fs::write("/tmp/faults-daemon.log", daemon.log());
    }
    let h = wait_health(broker.port, device, Duration::from_secs(10), |_| true).unwrap_or_default();
    let diag = format!(
        "faults {fault_log:?}; {} connections through the proxy; {repeats} byte-identical QoS 1 \
         retransmission(s); transport {}; counters {}\n{}",
        proxy.connections(),
        h["transport"],
        h["pipelines"]["digits"]["counters"],
        daemon
            .log()
            .lines()
            .filter(|l| l.contains("WARN") || l.contains("broker"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(
        missing.is_empty(),
        "{} of {want} results missing, e.g. {:?}\n{diag}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    assert!(served_twice.is_empty(), "frames served twice: {served_twice:?}\n{diag}");
    assert_eq!(seen.len(), want);
    let counters = &h["pipelines"]["digits"]["counters"];
    assert_eq!(counters["served"].as_u64(), Some(want as u64), "{diag}");
    // The faults really cut the daemon off: it reconnected after each of them.
    assert!(proxy.connections() >= 6, "{diag}");
    assert!(h["transport"]["reconnects"].as_u64().unwrap_or(0) >= 5, "{diag}");
    eprintln!("{want} frames, all served once; {diag}");
}

/// Fault injection: `kill -9` while results are being spooled. Every segment on disk is whole
/// (written to a temporary file, fsync'd, renamed), the restarted daemon publishes each of its
/// results once, and nothing is left half-written.
#[test]
fn kill_9_while_spooling_leaves_only_whole_segments() {
    let mut rig = SlowRig::start("k9", "\n[spool]\ncommit_interval = \"20ms\"\n");
    let dev = MqttClient::connect(rig.broker.port, "dev-k9").expect("device");
    rig.publish(&dev, 150);
    drop(dev);
    rig.kill_broker();
    let SlowRig { state, mut broker, cfg, mut daemon, .. } = rig;
    let spool_dir = state.path().join("spool");
    let segments = || {
        std::fs::read_dir(&spool_dir)
            .map(|d| {
                d.flatten().filter(|e| e.file_name().to_string_lossy().ends_with(".seg")).count()
            })
            .unwrap_or(0)
    };
    // Mid-stream: several segments written, more results still coming.
    assert!(eventually(Duration::from_secs(60), || segments() >= 3), "{}", daemon.log());
    daemon.kill9();
    let on_disk = segments();
    broker.restart().expect("broker restart");
    let obs = MqttClient::connect(broker.port, "obs-k9").expect("observer");
    obs.subscribe("r/#").expect("subscribe");
    let daemon = Daemon::start(&cfg).expect("daemon again");
    let h = wait_health(broker.port, "k9", Duration::from_secs(30), |v| {
        v["transport"]["spool"]["active"] == false
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", daemon.log()));
    let sp = &h["transport"]["spool"];
    assert_eq!(sp["errors"], 0, "no damaged segment after kill -9: {sp}");
    assert_eq!(sp["evicted"], 0, "{sp}");
    let recovered = sp["recovered"].as_u64().unwrap_or(0);
    assert!(recovered > 0 && on_disk >= 3, "{sp}");
    assert_eq!(sp["flushed"].as_u64(), Some(recovered), "{sp}");
    let got = obs
        .collect_until(Duration::from_secs(30), |m| m.len() as u64 >= recovered)
        .expect("recovered results");
    assert!(obs.recv(Duration::from_secs(2)).is_none(), "a result was published twice");
    let topics: BTreeSet<&str> = got.iter().map(|m| m.topic.as_str()).collect();
    assert_eq!(topics.len() as u64, recovered, "each recovered result once");
    let leftovers: Vec<String> = std::fs::read_dir(&spool_dir)
        .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    assert!(leftovers.is_empty(), "spool not emptied: {leftovers:?}");
}
