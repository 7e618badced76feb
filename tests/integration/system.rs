//! The daemon as a system citizen, observed from outside like systemd and an operator would:
//! notifications on a NOTIFY_SOCKET the test owns, the watchdog going quiet when a worker is
//! wedged (test-only fault hook), capabilities and no_new_privs in /proc, thread placement on
//! CPUs, scheduling classes, and refusing to run as root.

use std::time::{Duration, Instant};

use edgeinfer_tests::{
    Daemon, Fixture, Mosquitto, MqttClient, NotifySocket, config, edgeinfer, status_field, threads,
    wait_online,
};
use nix::sys::signal::Signal;
use rumqttc::QoS;

fn notify_env(sock: &NotifySocket, watchdog: Option<Duration>) -> Vec<(&'static str, String)> {
    let mut env = vec![("NOTIFY_SOCKET", sock.path.display().to_string())];
    if let Some(w) = watchdog {
        env.push(("WATCHDOG_USEC", w.as_micros().to_string()));
    }
    env
}

/// READY=1 comes only after every model is loaded and warmed up, then STATUS= and periodic
/// WATCHDOG=1; a wedged worker stops the pings; SIGTERM sends STOPPING=1.
#[test]
fn notify_ready_after_warm_up_watchdog_and_wedged_worker() {
    let mobilenet = Fixture::load("mobilenet").expect("fixture");
    let digits = Fixture::load("digits").expect("fixture");
    let broker = Mosquitto::start().expect("mosquitto");
    let pipelines = [
        mobilenet.pipeline(
            "mobilenet",
            "m/+",
            "r/m/{1}",
            "format = \"raw\"\nmax_payload = \"1MiB\"",
        ),
        digits.pipeline("digits", "d/+", "r/d/{1}", ""),
    ]
    .concat();
    let sock = NotifySocket::bind().expect("notify socket");
    let env = notify_env(&sock, Some(Duration::from_millis(2000)));
    let mut env = env;
    // Fault injection (test-only hook): the worker that picks up seq 7 wedges forever.
    env.push(("EDGEINFER_FAULT_WEDGE_SEQ", "7".to_string()));
    let mut daemon =
        Daemon::start_with_env(&config(broker.port, "notify", &pipelines), &env).expect("daemon");

    let before_ready = sock.wait_for("READY=1", Duration::from_secs(60)).expect("READY=1");
    assert!(
        daemon.log().contains("test-only fault hooks are compiled in"),
        "this test needs the daemon built with --features fault-hooks (tools/test.sh does)"
    );
    let ready = before_ready.last().expect("ready message");
    // Everything READY=1 promises had already happened, in order.
    let log = daemon.log();
    for pipeline in ["pipeline=mobilenet", "pipeline=digits"] {
        let warm = log.lines().position(|l| l.contains("warm-up run") && l.contains(pipeline));
        assert!(warm.is_some(), "{pipeline} was not warmed up before READY=1:\n{log}");
    }
    assert!(log.contains("privileges dropped"), "{log}");
    assert!(ready.contains("STATUS=online; 2 pipeline(s)"), "{ready}");
    assert!(ready.contains(&format!("MAINPID={}", daemon.pid())), "{ready}");
    assert!(
        before_ready.iter().all(|m| !m.contains("WATCHDOG=1")),
        "no pings before ready: {before_ready:?}"
    );

    // Healthy: pings keep coming (period 2 s, the daemon pings every 0.5 s).
    let healthy = sock.collect_for(Duration::from_millis(2500));
    let pings = healthy.iter().filter(|m| m.as_str() == "WATCHDOG=1").count();
    assert!(pings >= 3, "expected periodic WATCHDOG=1, got {healthy:?}");

    // Wedge the digits worker, and show the mobilenet worker still serving does not matter.
    let dev = MqttClient::connect(broker.port, "dev-notify").expect("device");
    dev.publish("d/a", digits.json_frame(0, 7), QoS::AtLeastOnce, false).expect("publish");
    daemon.wait_log("withholding watchdog pings", Duration::from_secs(10)).expect("stall detected");
    // Pings sent before the stall was detected are still queued in the socket: read them first.
    sock.collect_for(Duration::from_millis(100));
    let after = sock.collect_for(Duration::from_millis(2500));
    assert!(
        !after.iter().any(|m| m == "WATCHDOG=1"),
        "pings continued with a wedged worker: {after:?}"
    );
    assert!(daemon.is_running(), "the daemon itself keeps running; systemd does the restart");
    daemon.kill9();
}

#[test]
fn notify_stopping_on_sigterm_and_status_updates() {
    let digits = Fixture::load("digits").expect("fixture");
    let broker = Mosquitto::start().expect("mosquitto");
    let sock = NotifySocket::bind().expect("notify socket");
    let cfg = config(broker.port, "stopping", &digits.pipeline("digits", "d/+", "r/{1}", ""));
    let mut daemon = Daemon::start_with_env(&cfg, &notify_env(&sock, None)).expect("daemon");
    sock.wait_for("READY=1", Duration::from_secs(30)).expect("ready");
    // Health ticks every second in the test config; each one refreshes STATUS=.
    let status = sock.wait_for("STATUS=online", Duration::from_secs(5)).expect("status update");
    assert!(
        status.iter().all(|m| !m.contains("WATCHDOG")),
        "no watchdog without WATCHDOG_USEC: {status:?}"
    );
    daemon.signal(Signal::SIGHUP);
    let reload = sock.wait_for("READY=1", Duration::from_secs(5)).expect("ready after reload");
    assert!(reload.iter().any(|m| m.starts_with("RELOADING=1\nMONOTONIC_USEC=")), "{reload:?}");
    daemon.signal(Signal::SIGTERM);
    sock.wait_for("STOPPING=1", Duration::from_secs(10)).expect("stopping");
    assert!(daemon.wait_exit(Duration::from_secs(10)).expect("exit").success());
}

/// After start-up every thread has an empty effective and permitted capability set and
/// no_new_privs; workers sit on their configured CPU, I/O threads on the I/O CPUs.
#[test]
fn capabilities_dropped_and_threads_placed_on_their_cpus() {
    let allowed = edgeinfer_tests::allowed_cpus();
    if allowed.len() < 2 {
        eprintln!("skipped: needs 2 CPUs, this process may use {allowed:?}");
        return;
    }
    let (io, inf) = (allowed[0], allowed[1]);
    let digits = Fixture::load("digits").expect("fixture");
    let broker = Mosquitto::start().expect("mosquitto");
    let pipelines = digits.pipeline("digits", "d/+", "r/{1}", "workers = 2");
    let cfg = config(broker.port, "placed", &pipelines)
        .replace("[system]", &format!("[system]\nio_cpus = [{io}]\ninference_cpus = [{inf}]"));
    let daemon = Daemon::start(&cfg).expect("daemon");
    wait_online(broker.port, "placed");
    let pid = daemon.pid();
    let tasks = threads(pid);
    let mut workers = 0;
    let mut io_threads = 0;
    for (tid, name, status) in &tasks {
        assert_eq!(
            status_field(status, "CapEff").as_deref(),
            Some("0000000000000000"),
            "{name} ({tid}) CapEff"
        );
        assert_eq!(
            status_field(status, "CapPrm").as_deref(),
            Some("0000000000000000"),
            "{name} ({tid}) CapPrm"
        );
        assert_eq!(
            status_field(status, "CapAmb").as_deref(),
            Some("0000000000000000"),
            "{name} ({tid}) CapAmb"
        );
        assert_eq!(status_field(status, "NoNewPrivs").as_deref(), Some("1"), "{name} ({tid})");
        let cpus = status_field(status, "Cpus_allowed_list").unwrap_or_default();
        if name.starts_with("ei-digits-") {
            workers += 1;
            assert_eq!(cpus, inf.to_string(), "worker {name} placement");
        } else if name.starts_with("edgeinfer") {
            io_threads += 1;
            assert_eq!(cpus, io.to_string(), "I/O thread {name} placement");
        }
    }
    assert_eq!(
        workers,
        2,
        "two workers in {tasks:?}",
        tasks = tasks.iter().map(|t| &t.1).collect::<Vec<_>>()
    );
    assert!(io_threads >= 2, "main + tokio I/O thread");
    // The health message reports the same.
    let h = edgeinfer_tests::wait_health(broker.port, "placed", Duration::from_secs(10), |v| {
        v["system"].is_object()
    })
    .expect("health");
    assert_eq!(h["system"]["privileges"]["cap_eff"], "0000000000000000");
    assert_eq!(h["system"]["privileges"]["no_new_privs"], true);
    assert_eq!(h["system"]["cpus"]["inference"], inf.to_string());
    assert!(h["system"]["cgroup"]["mode"].is_string());
}

/// Real-time workers: with CAP_SYS_NICE kept, workers run SCHED_FIFO and the capability is all
/// that is left; without it, the daemon warns and runs the default class.
#[test]
fn fifo_workers_with_and_without_cap_sys_nice() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs CAP_SYS_NICE to grant");
        return;
    }
    let digits = Fixture::load("digits").expect("fixture");
    for keep in [true, false] {
        let broker = Mosquitto::start().expect("mosquitto");
        let device = if keep { "fifo-kept" } else { "fifo-dropped" };
        let caps = if keep { "keep_capabilities = [\"CAP_SYS_NICE\"]\n" } else { "" };
        let cfg = config(broker.port, device, &digits.pipeline("digits", "d/+", "r/{1}", ""))
            .replace(
                "[system]",
                &format!("[system]\nworker_sched = \"fifo\"\nworker_priority = 5\n{caps}"),
            );
        let daemon = Daemon::start(&cfg).expect("daemon");
        wait_online(broker.port, device);
        let tasks = threads(daemon.pid());
        let (tid, _, status) =
            tasks.iter().find(|t| t.1.starts_with("ei-digits-")).expect("worker thread");
        let stat = std::fs::read_to_string(format!("/proc/{}/task/{tid}/stat", daemon.pid()))
            .expect("stat");
        // Field 41 is the scheduling policy (1 = SCHED_FIFO); fields after the `(comm)`.
        let after_comm = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
        let policy: u32 =
            after_comm.split_whitespace().nth(41 - 3).and_then(|p| p.parse().ok()).expect("policy");
        if keep {
            assert_eq!(policy, 1, "SCHED_FIFO with CAP_SYS_NICE");
            assert_eq!(
                status_field(status, "CapEff").as_deref(),
                Some("0000000000800000"),
                "only CAP_SYS_NICE"
            );
        } else {
            assert_eq!(policy, 0, "default class without the capability");
            assert!(daemon.log().contains("hint: it needs CAP_SYS_NICE"), "{}", daemon.log());
        }
    }
}

#[test]
fn refuses_to_run_as_root_without_allow_root() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: not running as root");
        return;
    }
    let digits = Fixture::load("digits").expect("fixture");
    let dir = tempfile::tempdir().expect("tmp");
    let cfg = dir.path().join("c.toml");
    let text = config(1, "root", &digits.pipeline("digits", "d/+", "r/{1}", ""))
        .replace("allow_root = true", "");
    std::fs::write(&cfg, text).expect("write");
    let started = Instant::now();
    let out = edgeinfer(&["run", "--config", cfg.to_str().expect("utf8")]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{stderr}");
    assert!(
        stderr.contains("refusing to run as root") && stderr.contains("User=edgeinfer"),
        "{stderr}"
    );
    assert!(!stderr.contains("warm-up"), "refused before loading models: {stderr}");
    assert!(started.elapsed() < Duration::from_secs(10));
}
