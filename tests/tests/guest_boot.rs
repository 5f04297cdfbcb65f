//! Boots the real guest under QEMU TCG (2 vCPUs) and checks what it reports.

use std::time::Duration;

use milk_harness::HarnessError;
use milk_tests::{boot_field, guest};

#[test]
fn boots_with_two_cpus_and_sched_ext() {
    let g = guest();
    let out = g.run(
        &g.spec("milk.run=\"cat /sys/kernel/sched_ext/state; grep -c ^processor /proc/cpuinfo\""),
    );
    assert_eq!(out.result.map(|r| r.status), Some(0));
    let banner = format!("Linux version {}-milk", g.kernel.version);
    assert!(out.console_has(&banner), "no kernel banner {banner:?}");
    assert_eq!(
        boot_field(&out, "kernel"),
        Some(format!("{}-milk", g.kernel.version))
    );
    assert_eq!(boot_field(&out, "cpus").as_deref(), Some("2"));
    assert!(out.console_has("smp: Brought up 1 node, 2 CPUs"));
    // Without the test scheduler sched_ext is present but idle.
    assert_eq!(boot_field(&out, "sched_ext").as_deref(), Some("disabled"));
    assert!(out.console.iter().any(|l| l.trim() == "disabled"));
    assert!(
        out.console.iter().any(|l| l.trim() == "2"),
        "cpuinfo count missing"
    );
    let to_init = out.to_init.expect("reached /init");
    println!(
        "reached /init after {to_init:?} wall; whole run {:?}",
        out.elapsed
    );
    assert!(to_init < Duration::from_secs(60), "boot took {to_init:?}");
}

#[test]
fn test_fifo_scheduler_enables_and_schedules_a_workload() {
    let g = guest();
    let out = g.run(&g.spec("scx_test_fifo milk.run=\"milk-work -t 16 -r 5 -w 20000 -s 2000\""));
    assert_eq!(boot_field(&out, "sched_ext").as_deref(), Some("enabled"));
    assert_eq!(boot_field(&out, "ops").as_deref(), Some("milk_test_fifo"));
    assert!(out.console_has("sched_ext: BPF scheduler \"milk_test_fifo\" enabled"));
    assert!(
        out.console_has("threads=16 rounds=5 ok=16 bad=0"),
        "workload did not complete correctly"
    );
    assert_eq!(out.result.map(|r| r.status), Some(0));
}

#[test]
fn failing_command_status_reaches_the_host() {
    let g = guest();
    let out = g.run(&g.spec("milk.run=\"exit 7\""));
    assert_eq!(out.result.map(|r| r.status), Some(7));
}

#[test]
fn hung_guest_is_killed_at_the_timeout_with_its_console_tail() {
    let g = guest();
    let token = format!("milk.test_token={}", std::process::id());
    let mut spec = g.spec(&format!(
        "{token} milk.run=\"echo about-to-hang; sleep 100000\""
    ));
    spec.timeout = Duration::from_secs(25);
    let t = std::time::Instant::now();
    match milk_harness::run_qemu(&spec, &mut |_| {}) {
        Err(HarnessError::Timeout { secs, tail }) => {
            assert_eq!(secs, 25);
            assert!(
                tail.contains("about-to-hang"),
                "tail lacks the last output:\n{tail}"
            );
        }
        other => panic!("expected a timeout, got {other:?}"),
    }
    assert!(t.elapsed() < Duration::from_secs(40));
    // The QEMU process is gone: no process still carries our token.
    let leftovers: Vec<String> = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| std::fs::read(e.ok()?.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains(&token))
        .collect();
    assert!(leftovers.is_empty(), "leftover processes: {leftovers:?}");
}
