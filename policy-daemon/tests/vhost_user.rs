//! Host-only tests of `milk-policy` through real vhost-user messages: a fake guest on
//! memfd memory, the frontend milk-vmm uses, and the daemon as a child process.

mod common;

use std::time::{Duration, Instant};

use common::{max_gap_after, Daemon, FakeGuest};
use milk_policy_daemon::frontend::{FrontendEvent, MilkFrontend};
use virtio_milk::metrics::monotonic_ns;

const CPUS: u16 = 2;
const TASKS: u32 = 8;

fn ms(ns: u64) -> f64 {
    ns as f64 / 1e6
}

#[test]
fn daemon_schedules_a_fake_guest_and_exits_when_the_frontend_leaves() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("a.sock");
    let mut d = Daemon::start(&sock, CPUS);
    let mut g = FakeGuest::new(CPUS, TASKS);
    let fe = MilkFrontend::start(&sock, g.setup()).expect("frontend start");
    assert!(
        g.run_until(Duration::from_secs(20), |g| g.run_times.len() >= 500),
        "only {} RUNs applied",
        g.run_times.len()
    );
    assert!(g.enabled);
    assert_eq!(g.hellos.iter().filter(|&&s| s != g.session).count(), 0);
    assert_eq!(g.protocol_errors, 0);
    assert_eq!(g.rejected.iter().sum::<u64>(), 0, "{:?}", g.rejected);
    let st = fe.status();
    assert!(st.connected && st.hangups == 0);
    fe.stop();
    // Without exit_event() the daemon would hang here dropping VhostUserDaemon.
    let status = d
        .wait_exit(Duration::from_secs(10))
        .expect("daemon exits after the frontend left");
    assert!(status.success(), "{status}");
}

/// `<socket>.stats` (what milk-vmm reads for `milkctl status` with `--policy-socket`):
/// mode 0600, the daemon's pid, policy and state, and counters that follow the runtime;
/// removed when the daemon exits.
#[test]
fn stats_socket_reports_the_running_runtime_counters() {
    use milk_policy_daemon::stats;
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("a.sock");
    let mut d = Daemon::start(&sock, CPUS);
    let path = stats::stats_path(&sock);
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "stats socket mode {mode:o}");
    let idle = stats::query(&sock, Duration::from_secs(5)).expect("stats before the frontend");
    assert_eq!(idle["state"], "idle", "{idle}");
    assert_eq!(idle["runs"], 0, "{idle}");
    assert!(idle["run"].is_null(), "{idle}");
    assert_eq!(idle["pid"], d.child.id(), "{idle}");
    let mut g = FakeGuest::new(CPUS, TASKS);
    let fe = MilkFrontend::start(&sock, g.setup()).expect("frontend start");
    assert!(g.run_until(Duration::from_secs(20), |g| g.run_times.len() >= 300));
    // The runtime's snapshot is at most one period (100 ms) old; keep the guest going.
    let mut seen = None;
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(10) {
        g.run_for(Duration::from_millis(100));
        let st = stats::query(&sock, Duration::from_secs(5)).expect("stats while running");
        if st["run"]["counters"]["decisions_run"].as_u64().unwrap_or(0) >= 300 {
            seen = Some(st);
            break;
        }
    }
    let st = seen.expect("the stats caught up with the runtime");
    println!("{st}");
    assert_eq!(st["state"], "running", "{st}");
    assert_eq!(
        (st["policy"].as_str(), st["cpus"].as_u64()),
        (Some("fifo"), Some(2))
    );
    assert_eq!(st["runs"], 1, "{st}");
    let run = &st["run"];
    assert_eq!(run["session_id"], g.session, "{st}");
    assert_eq!(run["session_established"], true, "{st}");
    assert_eq!(run["tasks"].as_u64(), Some(u64::from(TASKS)), "{st}");
    let c = &run["counters"];
    assert!(c["acks"]["ok"].as_u64().unwrap() > 0, "{st}");
    assert!(c["messages"].as_u64().unwrap() > c["decisions_run"].as_u64().unwrap() / 2);
    assert_eq!(c["malformed"], 0, "{st}");
    assert!(
        run["latency"]["event_to_decision"]["count"]
            .as_u64()
            .unwrap()
            > 0
    );
    fe.stop();
    d.wait_exit(Duration::from_secs(10)).expect("daemon exits");
    assert!(!path.exists(), "stats socket removed at exit");
}

#[test]
fn daemon_for_another_cpu_count_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("a.sock");
    let _d = Daemon::start(&sock, 4);
    let g = FakeGuest::new(CPUS, TASKS);
    let err = MilkFrontend::start(&sock, g.setup())
        .err()
        .expect("mismatch refused");
    assert!(err.to_string().contains("cpus"), "{err}");
}

#[test]
fn five_planned_swaps_keep_the_session_and_every_task() {
    let dir = tempfile::tempdir().unwrap();
    let mut g = FakeGuest::new(CPUS, TASKS);
    let first = dir.path().join("d0.sock");
    let mut old = Daemon::start(&first, CPUS);
    let fe = MilkFrontend::start(&first, g.setup()).unwrap();
    assert!(g.run_until(Duration::from_secs(20), |g| g.run_times.len() >= 200));
    let session = g.session;
    let mut blackouts = Vec::new();
    let mut gaps = Vec::new();
    for i in 1..=5 {
        let path = dir.path().join(format!("d{i}.sock"));
        let new = Daemon::start(&path, CPUS);
        // The guest keeps running while the frontend swaps from another thread.
        let runs_before = g.run_times.len();
        let t_swap = monotonic_ns();
        let report = std::thread::scope(|s| {
            let h = s.spawn(|| fe.swap(&path));
            while !h.is_finished() {
                g.step();
            }
            h.join().unwrap()
        })
        .expect("swap");
        assert!(
            g.run_until(Duration::from_secs(20), |g| g.run_times.len()
                >= runs_before + 200),
            "swap {i}: scheduling did not resume"
        );
        blackouts.push(report.blackout);
        gaps.push(max_gap_after(&g.run_times, t_swap));
        assert!(report.state_bytes > 0);
        // The old daemon leaves once the frontend dropped it.
        assert!(
            old.wait_exit(Duration::from_secs(10)).is_some(),
            "swap {i}: old daemon stays"
        );
        old = new;
        assert_eq!(g.session, session, "swap {i}: the guest saw a new session");
        assert!(g.enabled, "swap {i}: fallback");
        assert!(g.goodbyes.is_empty(), "swap {i}: GOODBYE");
    }
    assert!(g.hellos.iter().all(|&s| s == session), "{:?}", g.hellos);
    assert_eq!(g.rejected.iter().sum::<u64>(), 0, "{:?}", g.rejected);
    assert_eq!(g.protocol_errors, 0);
    // Every task still gets scheduled by the last daemon.
    assert_eq!(fe.status().swaps, 5);
    assert!(
        g.run_until(Duration::from_secs(20), |g| g.run_times.len() >= 2000),
        "{}",
        g.run_times.len()
    );
    for (b, gap) in blackouts.iter().zip(&gaps) {
        eprintln!(
            "swap blackout (frontend) {:.3} ms, longest RUN gap seen by the guest {:.3} ms",
            b.as_secs_f64() * 1e3,
            ms(*gap)
        );
        // Generous bound for a loaded 2-core machine; the report carries the numbers.
        assert!(*b < Duration::from_millis(500), "{b:?}");
    }
}

#[test]
fn three_kill_9_fall_back_at_once_and_reconnect_with_a_new_session() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("p.sock");
    let mut g = FakeGuest::new(CPUS, TASKS);
    let mut d = Daemon::start(&sock, CPUS);
    let fe = MilkFrontend::start(&sock, g.setup()).unwrap();
    assert!(g.run_until(Duration::from_secs(20), |g| g.run_times.len() >= 200));
    let mut sessions = vec![g.session];
    for i in 1..=3 {
        let t_kill = monotonic_ns();
        d.kill9();
        let t0 = Instant::now();
        assert!(
            g.run_until(Duration::from_secs(5), |g| g.goodbyes.len() == i),
            "kill {i}: no GOODBYE"
        );
        let fallback = g.goodbyes[i - 1] - t_kill;
        assert!(
            fallback < 1_000_000_000,
            "kill {i}: fallback after {} ms",
            ms(fallback)
        );
        assert!(!g.enabled);
        // A restarted daemon on the same path is found by the supervisor.
        d = Daemon::start(&sock, CPUS);
        let runs = g.run_times.len();
        assert!(
            g.run_until(Duration::from_secs(20), |g| g.enabled
                && g.run_times.len() >= runs + 200),
            "kill {i}: not re-enabled"
        );
        assert_ne!(
            g.session,
            *sessions.last().unwrap(),
            "kill {i}: same session"
        );
        sessions.push(g.session);
        eprintln!(
            "kill {i}: GOODBYE {:.3} ms after SIGKILL, scheduling again {:.0} ms after",
            ms(fallback),
            t0.elapsed().as_secs_f64() * 1e3
        );
    }
    let st = fe.status();
    assert_eq!((st.hangups, st.reconnects), (3, 3));
    let hang: Vec<_> = fe
        .events()
        .into_iter()
        .filter(|e| matches!(e, FrontendEvent::HungUp { goodbye: true, .. }))
        .collect();
    assert_eq!(hang.len(), 3);
    assert_eq!(g.protocol_errors, 0);
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p / 100.0).round() as usize]
}

/// The numbers of docs/benchmarks.md, "Out-of-process policies" (host-only part):
/// `cargo test --release -p milk-policy-daemon --test vhost_user -- --ignored --nocapture`.
#[test]
#[ignore = "benchmark: run by hand, see docs/benchmarks.md"]
fn bench_swap_blackout_and_crash_fallback() {
    let dir = tempfile::tempdir().unwrap();
    let mut g = FakeGuest::new(CPUS, TASKS);
    let first = dir.path().join("s0.sock");
    let _d0 = Daemon::start(&first, CPUS);
    let fe = MilkFrontend::start(&first, g.setup()).unwrap();
    assert!(g.run_until(Duration::from_secs(20), |g| g.run_times.len() >= 500));
    let (mut blackout, mut gap) = (Vec::new(), Vec::new());
    let mut keep = Vec::new();
    for i in 1..=50 {
        let p = dir.path().join(format!("s{i}.sock"));
        let d = Daemon::start(&p, CPUS);
        let runs = g.run_times.len();
        let t = monotonic_ns();
        let r = std::thread::scope(|s| {
            let h = s.spawn(|| fe.swap(&p));
            while !h.is_finished() {
                g.step();
            }
            h.join().unwrap()
        })
        .unwrap();
        assert!(g.run_until(Duration::from_secs(20), |g| g.run_times.len() >= runs + 300));
        blackout.push(r.blackout.as_secs_f64() * 1e3);
        gap.push(ms(max_gap_after(&g.run_times, t)));
        keep.push(d);
        if keep.len() > 2 {
            keep.remove(0);
        }
    }
    drop(fe);
    drop(keep);
    let mut g = FakeGuest::new(CPUS, TASKS);
    let sock = dir.path().join("k.sock");
    let mut d = Daemon::start(&sock, CPUS);
    let fe = MilkFrontend::start(&sock, g.setup()).unwrap();
    assert!(g.run_until(Duration::from_secs(20), |g| g.run_times.len() >= 200));
    let (mut bye, mut back) = (Vec::new(), Vec::new());
    for i in 1..=20 {
        let t = monotonic_ns();
        d.kill9();
        assert!(g.run_until(Duration::from_secs(5), |g| g.goodbyes.len() == i));
        bye.push(ms(g.goodbyes[i - 1] - t));
        d = Daemon::start(&sock, CPUS);
        let runs = g.run_times.len();
        assert!(g.run_until(Duration::from_secs(20), |g| g.run_times.len() > runs));
        back.push(ms(g.run_times[runs] - t));
    }
    drop(fe);
    for (name, v) in [
        ("swap blackout, frontend (ms)", &mut blackout),
        ("longest RUN gap across a swap, guest (ms)", &mut gap),
        ("kill -9 -> GOODBYE at the guest (ms)", &mut bye),
        (
            "kill -9 -> first RUN from the restarted daemon (ms)",
            &mut back,
        ),
    ] {
        let n = v.len();
        println!(
            "BENCH {name}: n={n} min {:.3} p50 {:.3} p90 {:.3} max {:.3}",
            pct(v, 0.0),
            pct(v, 50.0),
            pct(v, 90.0),
            pct(v, 100.0)
        );
    }
}
