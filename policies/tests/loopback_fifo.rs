//! The global FIFO policy driving the virtio-milk loopback harness end to end: real queue
//! engine and runtime on one thread, a simulated guest driver on shared memory on another.

use std::time::Duration;

use virtio_milk::loopback::{run_loopback, run_loopback_with_swap, LoopbackConfig, NotifyMode};
use virtio_milk::protocol::{msg, AckStatus};

fn fifo() -> Box<dyn virtio_milk::policy::Policy> {
    milk_policies::by_name("fifo").expect("fifo is registered")
}

fn check_clean(s: &virtio_milk::loopback::LoopbackStats, target: u64, tasks: u64) {
    let h = &s.host.metrics;
    // After the target, tasks already runnable still run once; nobody wakes again.
    let runs = s.runs_applied;
    assert!(
        (target..=target + tasks).contains(&runs),
        "applied {runs} runs for a target of {target}"
    );
    assert_eq!(s.latencies_ns.len() as u64, runs);
    assert_eq!(s.guest_protocol_errors, 0);
    assert_eq!(
        s.rejected,
        [0; AckStatus::COUNT],
        "guest rejected a decision: {}",
        s.host
    );
    assert_eq!(s.host.engine.malformed_total(), 0, "{}", s.host);
    assert_eq!(h.stale_events, 0);
    assert_eq!(h.unknown_task_events, 0);
    assert_eq!(h.policy_rejects, 0);
    // Every applied RUN was decided once and acked OK once.
    assert_eq!(h.decisions_run, runs, "{}", s.host);
    assert_eq!(h.acks[AckStatus::Ok as usize], runs);
    assert_eq!(h.acks_total(), runs);
    // Host message counters agree with what the guest sent.
    assert_eq!(h.messages(), s.records_sent, "{}", s.host);
    assert_eq!(h.msgs_by_type[usize::from(msg::TASK_BLOCKED)], runs);
    assert_eq!(h.msgs_by_type[usize::from(msg::ACK)], runs);
    // Decisions plus session records are everything the guest received.
    assert_eq!(
        s.records_received,
        h.decisions_run + h.decisions_preempt + h.session_sent - 1,
        "all but the final GOODBYE (sent after the guest stopped) arrived"
    );
    assert!(s.hellos >= 1);
    assert!(s.msgs_per_sec() > 0.0);
}

#[test]
fn fifo_dispatches_every_wakeup_notification_mode() {
    for batch in [1, 8, 32] {
        let cfg = LoopbackConfig {
            num_cpus: 4,
            tasks: 24,
            batch,
            mode: NotifyMode::Notification,
            runs: 3_000,
            timeout: Duration::from_secs(60),
            ..Default::default()
        };
        let s = run_loopback(cfg, fifo()).expect("loopback run");
        check_clean(&s, 3_000, 24);
        let h = &s.host.metrics;
        // Wakeups: one per task at start, then one per applied run except the last
        // `tasks` runs' worth that happen after stopping.
        assert!(h.msgs_by_type[usize::from(msg::TASK_WAKEUP)] >= 3_000);
        assert_eq!(h.msgs_by_type[usize::from(msg::TASK_NEW)], 24);
        if batch == 1 {
            assert_eq!(s.event_buffers, s.records_sent);
        } else {
            assert!(s.event_buffers < s.records_sent, "batching packs records");
        }
    }
}

#[test]
fn fifo_dispatches_every_wakeup_polling_mode() {
    let cfg = LoopbackConfig {
        num_cpus: 2,
        tasks: 8,
        batch: 8,
        mode: NotifyMode::Polling,
        runs: 5_000,
        ..Default::default()
    };
    let s = run_loopback(cfg, fifo()).expect("loopback run");
    check_clean(&s, 5_000, 8);
}

#[test]
fn more_cpus_than_tasks_and_no_event_idx() {
    let cfg = LoopbackConfig {
        num_cpus: 8,
        tasks: 3,
        batch: 4,
        event_idx: false,
        runs: 1_000,
        ..Default::default()
    };
    let s = run_loopback(cfg, fifo()).expect("loopback run");
    check_clean(&s, 1_000, 3);
}

#[test]
fn policy_swap_mid_run_is_only_a_pause() {
    let cfg = LoopbackConfig {
        num_cpus: 4,
        tasks: 16,
        batch: 8,
        runs: 4_000,
        ..Default::default()
    };
    let s = run_loopback_with_swap(cfg, fifo(), Some((1_500, fifo()))).expect("loopback run");
    check_clean(&s, 4_000, 16);
    assert_eq!(s.host.metrics.policy_swaps, 1);
    // The swap announces itself with a HELLO carrying the same session: the guest does not
    // re-announce its tasks.
    assert_eq!(s.hellos, 2);
    assert_eq!(s.host.metrics.msgs_by_type[usize::from(msg::TASK_NEW)], 16);
}

#[test]
fn hybrid_mode_spins_then_sleeps() {
    let cfg = LoopbackConfig {
        num_cpus: 2,
        tasks: 4,
        batch: 8,
        mode: NotifyMode::Hybrid(Duration::from_micros(50)),
        runs: 3_000,
        ..Default::default()
    };
    let s = run_loopback(cfg, fifo()).expect("loopback run");
    check_clean(&s, 3_000, 4);
}
