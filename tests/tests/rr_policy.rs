//! The preemptive round-robin policy (`rr`) on the real guest (QEMU TCG, virtio-milk
//! over ivshmem): the end-to-end user of protocol v2's time and preemption mechanisms.
//!
//! Four CPU-bound shell loops share 2 vCPUs for a few seconds under `rr:slice_us=5000`.
//! Checked: the host's slice timers fire and it sends preempting RUNs (`RUN_F_PREEMPT`),
//! the guest applies them (`host_preempts`) and acks them OK; the guest's CPU ticks reach
//! the host (`CPU_TICK`, which `rr` subscribes to); every spinner gets a share of the CPUs
//! (none starves behind a task that never blocks); milk stays enabled throughout with no
//! protocol error. The preemption and fairness numbers are printed.

use std::collections::HashMap;
use std::time::Duration;

use milk_harness::GuestSpec;
use milk_ivshmem::session::{run_milk_guest, MilkGuestConfig};
use virtio_milk::protocol::AckStatus;

/// Spinners started; 2 vCPUs, so each would get half a CPU under a fair scheduler.
const SPINNERS: usize = 4;
/// How long they spin, seconds.
const SPIN_S: u64 = 4;

fn fields(line: &str) -> HashMap<String, String> {
    line.split_whitespace()
        .filter_map(|w| w.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

#[test]
fn rr_preempts_cpu_bound_tasks_and_shares_the_cpus() {
    let _ = env_logger::builder().is_test(true).try_init();
    let g = milk_tests::guest();
    // busybox ash: each spinner is a subshell looping on the `:` builtin; after SPIN_S
    // seconds each one's user+system ticks (USER_HZ) are read from /proc/PID/stat.
    let script = format!(
        "i=0;while [ $(cat /sys/kernel/milk/state) != enabled ]&&[ $i -lt 200 ];\
         do usleep 50000;i=$((i+1));done;echo 5000 > /sys/kernel/milk/host_timeout_ms;\
         echo STATE $(cat /sys/kernel/milk/state);\
         for n in $(seq {SPINNERS});do (while :;do :;done)& echo $! >> /tmp/spin;done;\
         sleep {SPIN_S};for x in $(cat /tmp/spin);do echo SPIN pid=$x ticks=$(($(cut -d' ' -f14 /proc/$x/stat)+$(cut -d' ' -f15 /proc/$x/stat)));done;\
         kill $(cat /tmp/spin);wait;\
         echo END scx=$(cat /sys/kernel/sched_ext/state) ops=$(cat /sys/kernel/sched_ext/root/ops);\
         for c in host_preempts slice_expiries decisions_applied local_fallbacks enables disables host_timeouts bad_records;\
         do echo MILKC $c=$(cat /sys/kernel/milk/$c);done;exit 0"
    );
    // The script is quoted for the kernel command line: no double quote inside.
    assert!(!script.contains('"'), "{script}");
    let mut spec = GuestSpec::new(&g.kernel.vmlinux);
    spec.initrd = Some(g.initrd);
    spec.cpus = 2;
    spec.timeout = Duration::from_secs(300);
    spec.cmdline = format!("milk.run=\"{script}\"");
    assert!(spec.full_cmdline().len() < 2048, "guest script too long");
    let cfg = MilkGuestConfig::new(spec, "rr:slice_us=5000");

    let run = run_milk_guest(&cfg, &mut |l, _| println!("guest| {l}")).expect("guest ran");
    let console = &run.outcome.console;
    assert_eq!(run.status(), Some(0), "the guest script failed");
    assert!(
        console.iter().any(|l| l == "STATE enabled"),
        "milk enabled before the spinners started"
    );

    // Every spinner got a share of the CPUs.
    let ticks: Vec<u64> = console
        .iter()
        .filter(|l| l.starts_with("SPIN "))
        .map(|l| fields(l)["ticks"].parse().expect("ticks"))
        .collect();
    assert_eq!(ticks.len(), SPINNERS, "{console:?}");
    let total: u64 = ticks.iter().sum();
    // 2 vCPUs for SPIN_S s at USER_HZ 100, less what the shell and TCG take.
    assert!(
        total >= SPIN_S * 100,
        "the spinners ran {total} ticks in {SPIN_S} s on 2 vCPUs: {ticks:?}"
    );
    let fair = total / SPINNERS as u64;
    for t in &ticks {
        assert!(
            *t >= fair / 4,
            "a spinner got {t} ticks, a fair share is {fair}: {ticks:?}"
        );
    }

    // milk stayed on; the guest applied host preemptions.
    let end = console
        .iter()
        .find(|l| l.starts_with("END "))
        .map(|l| fields(l))
        .expect("END line");
    assert_eq!(
        (end["scx"].as_str(), end["ops"].as_str()),
        ("enabled", "milk")
    );
    let c: HashMap<String, u64> = console
        .iter()
        .filter_map(|l| l.strip_prefix("MILKC "))
        .filter_map(|w| w.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.trim().parse().expect("counter")))
        .collect();
    assert_eq!((c["enables"], c["disables"]), (1, 0), "{c:?}");
    assert_eq!(c["host_timeouts"], 0, "{c:?}");
    assert_eq!(c["bad_records"], 0, "{c:?}");
    // 4 spinners, 2 CPUs, 5 ms slices: hundreds of slice ends in SPIN_S s.
    assert!(
        c["host_preempts"] >= 20,
        "the guest applied {} host preemptions: {c:?}",
        c["host_preempts"]
    );

    // The host side: timers fired, preempting RUNs went out and were acked OK, ticks came.
    assert_eq!(run.summaries.len(), 1, "one runtime run");
    let s = &run.summaries[0];
    println!("{s}");
    let m = &s.metrics;
    assert!(m.timers_fired > 0, "no host slice timer fired: {s}");
    assert!(
        m.decisions_run_preempt >= c["host_preempts"] / 2,
        "host sent {} preempting RUNs, guest applied {} host preemptions: {s}",
        m.decisions_run_preempt,
        c["host_preempts"]
    );
    assert!(m.acks[AckStatus::Ok as usize] > 0, "{s}");
    assert!(m.ticks > 0, "no CPU_TICK reached the host: {s}");
    assert_eq!(m.policy_rejects, 0, "{s}");
    println!(
        "RR-BENCH spinners={SPINNERS} spin_s={SPIN_S} ticks={ticks:?} fair={fair} \
         host_preempts={} slice_expiries={} local_fallbacks={} run_preempt={} timers={} cpu_ticks={}",
        c["host_preempts"],
        c["slice_expiries"],
        c["local_fallbacks"],
        m.decisions_run_preempt,
        m.timers_fired,
        m.ticks
    );
}
