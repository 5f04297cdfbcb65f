//! rt-tests from the test initramfs run in the guest: `hackbench` and
//! `cyclictest` (Debian's dynamically linked binaries with the libraries
//! images/src/rt_tests.rs copies in) finish and report.

use std::time::Duration;

use milk_harness::GuestSpec;

#[test]
fn hackbench_and_cyclictest_run_in_the_guest() {
    let kernel = milk_guest_kernel::ensure_built().expect("guest kernel builds");
    let initrd = milk_images::ensure_test_initramfs().expect("test initramfs builds");
    let mut spec = GuestSpec::new(&kernel.vmlinux);
    spec.initrd = Some(initrd);
    spec.timeout = Duration::from_secs(180);
    spec.cmdline =
        "milk.run=\"hackbench -p -g 1 -l 10&&cyclictest -t1 -i 1000 -l 50 -q\"".to_string();
    let out = milk_harness::run_qemu(&spec, &mut |l| println!("guest| {l}"))
        .expect("guest runs to its end");
    assert_eq!(
        out.result.map(|r| r.status),
        Some(0),
        "{:?}",
        out.console_tail
    );
    let time = out
        .console
        .iter()
        .find_map(|l| l.strip_prefix("Time: "))
        .expect("hackbench printed no time");
    assert!(time.trim().parse::<f64>().is_ok_and(|t| t > 0.0), "{time}");
    let ct = out
        .console
        .iter()
        .find(|l| l.starts_with("T: 0 "))
        .expect("cyclictest printed no summary");
    let count: u64 = ct
        .split_once("C:")
        .and_then(|(_, r)| r.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no loop count in {ct}"));
    assert_eq!(count, 50, "{ct}");
    assert!(ct.contains("Avg:") && ct.contains("Max:"), "{ct}");
}
