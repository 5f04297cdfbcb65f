//! One runtime run's counters and latency histograms as the JSON of `status` and
//! `metrics` (docs/control.md). Shared by milk-vmm's control socket (a runtime in
//! process) and `milk-policy`'s stats socket (a runtime in the daemon), so both report
//! the same fields.

use serde_json::{json, Value};
use virtio_milk::metrics::{Histogram, Summary};
use virtio_milk::protocol::AckStatus;

fn hist(h: &Histogram) -> Value {
    json!({
        "count": h.count(),
        "min_ns": h.min(),
        "mean_ns": h.mean(),
        "p50_ns": h.percentile(50.0),
        "p90_ns": h.percentile(90.0),
        "p99_ns": h.percentile(99.0),
        "max_ns": h.max(),
    })
}

fn acks(a: &[u64; AckStatus::COUNT]) -> Value {
    let mut m = serde_json::Map::new();
    for s in AckStatus::ALL {
        m.insert(s.name().to_ascii_lowercase(), json!(a[s as usize]));
    }
    Value::Object(m)
}

/// The `counters` object of `status` and `metrics`.
pub fn counters(s: &Summary) -> Value {
    let m = &s.metrics;
    json!({
        "messages": m.messages(),
        "decisions_run": m.decisions_run,
        "decisions_preempt": m.decisions_preempt,
        "acks": acks(&m.acks),
        "stale_events": m.stale_events,
        "unknown_task_events": m.unknown_task_events,
        "policy_rejects": m.policy_rejects,
        "unmatched_acks": m.unmatched_acks,
        "queue_full": m.queue_full,
        "policy_swaps": m.policy_swaps,
        "guest_fallbacks": m.guest_fallbacks,
        "malformed": s.engine.malformed_total(),
    })
}

/// One run's part of `metrics`: policy, elapsed time, session, counters, messages by
/// type, engine counters and latency histograms.
pub fn run_metrics(s: &Summary) -> Value {
    let m = &s.metrics;
    let mut by_type = serde_json::Map::new();
    for ty in 0u16..128 {
        let c = m.msgs_by_type[usize::from(ty)];
        if c > 0 {
            by_type.insert(
                virtio_milk::protocol::type_name(ty).to_ascii_lowercase(),
                json!(c),
            );
        }
    }
    json!({
        "policy": s.policy,
        "run_elapsed_ms": s.elapsed.as_millis() as u64,
        "session_id": s.session_id,
        "session_established": s.session_established,
        "tasks": s.tasks,
        "counters": counters(s),
        "messages_by_type": Value::Object(by_type),
        "injected": m.injected,
        "discarded_on_start": m.discarded_on_start,
        "dropped_old_decisions": m.dropped_old_decisions,
        "session_sent": m.session_sent,
        "engine": {
            "event_chains": s.engine.event_chains,
            "records_in": s.engine.records_in,
            "records_out": s.engine.records_out,
            "decision_chains": s.engine.decision_chains,
            "decision_queue_empty": s.engine.decision_queue_empty,
            "interrupts": s.engine.interrupts,
            "interrupts_suppressed": s.engine.interrupts_suppressed,
        },
        "latency": {
            "event_to_decision": hist(&m.latency),
            "decision_to_ack": hist(&m.apply_latency),
            "swap_stall": hist(&m.swap_stall),
            "swap_blackout": hist(&m.swap_blackout),
            "decision_gap": hist(&m.decision_gap),
        },
    })
}

/// Copies the fields of object `from` into object `into` (later wins).
pub fn merge(into: &mut Value, from: &Value) {
    if let (Some(i), Some(f)) = (into.as_object_mut(), from.as_object()) {
        for (k, v) in f {
            i.insert(k.clone(), v.clone());
        }
    }
}
