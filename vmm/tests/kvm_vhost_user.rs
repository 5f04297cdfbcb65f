//! KVM, here: virtio-milk on milk-vmm's virtio-mmio bus with the queues served by an
//! out-of-process policy over vhost-user (`--policy-socket`), driven by the freestanding
//! test guest: memfd guest RAM shared with the daemon, ring addresses, the ioeventfds as
//! kick, the call eventfd relayed into InterruptStatus and the irqfd. The daemon runs on a
//! thread of the test through `milk_policy_daemon::daemon` (what `milk-policy` runs).

mod common;

use common::BIN;

use std::process::Command;
use std::time::{Duration, Instant};

use milk_policy_daemon::backend::{BackendConfig, BackendEvent};
use milk_policy_daemon::daemon;
use virtio_milk::protocol::AckStatus;
use virtio_milk::runtime::RuntimeConfig;

#[test]
fn cli_kvm_policy_socket_round_trip() {
    assert!(common::kvm_usable(), "/dev/kvm is needed for this test");
    let k = common::test_guest("pvh");
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("policy.sock");
    let listening = daemon::listen(
        &sock,
        BackendConfig {
            num_cpus: 1,
            policy: "fifo".into(),
            runtime: RuntimeConfig::default(),
        },
    )
    .unwrap();
    let server = std::thread::spawn(move || listening.serve_one().unwrap());
    let t0 = Instant::now();
    let out = Command::new(BIN)
        .args(["--kernel", k.to_str().unwrap()])
        .args(["--engine", "kvm", "--timeout", "120", "--policy-socket"])
        .arg(&sock)
        .env("RUST_LOG", "info")
        .output()
        .expect("run milk-vmm");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(stdout.contains("virtio-milk device"), "{stdout}");
    assert!(
        stdout.contains("milk: config num_cpus=1 version=2 record_size=64"),
        "config space comes from the daemon:\n{stdout}"
    );
    assert!(stdout.contains("milk: host HELLO, policy fifo"), "{stdout}");
    assert!(
        stdout.contains("milk: RUN pid=4242 gen=1 cpu=0 seq=2 "),
        "{stdout}"
    );
    assert!(stdout.contains("milk: round trip ok"), "{stdout}");
    assert!(
        stderr.contains("rings handed to the policy daemon"),
        "{stderr}"
    );
    // milk-vmm exited: the daemon saw the hang-up and returns.
    while !server.is_finished() {
        assert!(
            t0.elapsed() < Duration::from_secs(150),
            "daemon did not end"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let backend = server.join().unwrap();
    let runs = backend.summaries();
    assert_eq!(runs.len(), 1, "one runtime run");
    let m = &runs[0].metrics;
    assert_eq!(m.decisions_run, 1);
    assert_eq!(m.acks[AckStatus::Ok as usize], 1);
    assert_eq!(m.messages(), 4, "{}", runs[0]);
    assert_eq!(runs[0].engine.malformed_total(), 0);
    assert!(runs[0].engine.interrupts >= 1, "calls reached the guest");
    let ev = backend.events();
    assert!(
        matches!(
            ev.first(),
            Some(BackendEvent::Started { resumed: false, .. })
        ),
        "{ev:?}"
    );
}

#[test]
fn cli_policy_socket_without_a_daemon_is_unavailable() {
    let k = common::test_guest("pvh");
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .args(["--kernel", k.to_str().unwrap()])
        .args(["--engine", "kvm", "--timeout", "30", "--policy-socket"])
        .arg(dir.path().join("nobody.sock"))
        .output()
        .expect("run milk-vmm");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(69), "{stderr}");
    assert!(
        stderr.contains("cannot connect to policy daemon"),
        "{stderr}"
    );
}
