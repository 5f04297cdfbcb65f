//! The milkctl binary against a control socket with a real virtio-milk device behind it:
//! human output, `--json`, exit statuses.

use std::path::Path;
use std::process::{Command, Output};
use std::sync::Arc;

use milk_control::{ControlServer, VmControl};
use virtio_milk::control::{MilkControl, PolicyControl};
use virtio_milk::device::{Activation, MilkDevice};
use virtio_milk::loopback::LoopbackMemory;
use virtio_milk::protocol::VIRTIO_F_VERSION_1;
use virtio_milk::runtime::RuntimeConfig;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const BIN: &str = env!("CARGO_BIN_EXE_milkctl");

fn milkctl(sock: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .arg("--api-sock")
        .arg(sock)
        .args(args)
        .output()
        .expect("run milkctl")
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn commands_human_and_json() {
    let lm = LoopbackMemory::new(1, 16, 256).unwrap();
    let p = milk_policies::resolve("fifo").unwrap();
    let dev = MilkControl::new(
        MilkDevice::with_policy(1, &p.spec, p.factory, RuntimeConfig::default()).unwrap(),
    );
    dev.activate(Activation {
        memory: lm.mem.clone(),
        features: 1 << VIRTIO_F_VERSION_1,
        queues: lm.queues.clone(),
        kicks: vec![EventFd::new(EFD_NONBLOCK).unwrap()],
        interrupt: Box::new(|_q: u16| Ok(())),
        ring_state: None,
    })
    .unwrap();
    let vm = Arc::new(VmControl::new(
        "kvm",
        Some(Arc::new(dev.clone()) as Arc<dyn PolicyControl>),
        Box::new(|| Ok(())),
    ));
    let dir = tempfile::tempdir().unwrap();
    let server = ControlServer::bind(&dir.path().join("s"), vm).unwrap();
    let sock = server.path();

    let o = milkctl(sock, &["status"]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}{err}");
    assert!(out.contains("engine:     kvm"), "{out}");
    assert!(out.contains("policy:     fifo"), "{out}");
    assert!(out.contains("state:      running"), "{out}");

    let o = milkctl(sock, &["--json", "status"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["ok"], true);
    assert_eq!(v["result"]["engine"], "kvm");

    let o = milkctl(sock, &["policies"]);
    assert!(text(&o).0.contains("fifo"), "{:?}", text(&o));

    let o = milkctl(sock, &["swap", "fifo:slice_us=250"]);
    let (out, _) = text(&o);
    assert!(o.status.success());
    assert!(
        out.contains("policy fifo -> fifo:slice_us=250: swapped in the running runtime"),
        "{out}"
    );
    assert_eq!(dev.policy(), "fifo:slice_us=250");

    let o = milkctl(sock, &["swap", "rr2000"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o).1.contains("unknown policy \"rr2000\""),
        "{:?}",
        text(&o)
    );
    let o = milkctl(sock, &["swap", "rr2000", "--json"]);
    assert_eq!(o.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["ok"], false);
    assert_eq!(dev.policy(), "fifo:slice_us=250", "unchanged");

    dev.wait_for(std::time::Duration::from_secs(5), |_| true)
        .unwrap();
    let o = milkctl(sock, &["metrics"]);
    let (out, _) = text(&o);
    assert!(out.contains("event_to_decision: n "), "{out}");
    let o = milkctl(sock, &["metrics", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(v["result"]["latency"]["decision_to_ack"]["p99_ns"].is_u64());

    let o = milkctl(sock, &["pause"]);
    assert!(text(&o).0.contains("paused: the guest falls back"));
    let o = milkctl(sock, &["resume"]);
    assert!(text(&o).0.contains("resumed with policy fifo:slice_us=250"));
    let o = milkctl(sock, &["stop"]);
    assert!(text(&o).0.contains("stopping the VM"));

    // Usage errors and a missing VMM.
    assert_eq!(milkctl(sock, &["frobnicate"]).status.code(), Some(64));
    assert_eq!(milkctl(sock, &["swap"]).status.code(), Some(64));
    let o = milkctl(&dir.path().join("none"), &["status"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).1.contains("cannot connect"), "{:?}", text(&o));
    let o = Command::new(BIN).arg("--help").output().unwrap();
    assert!(o.status.success());
    assert!(text(&o).0.contains("swap"));
}
