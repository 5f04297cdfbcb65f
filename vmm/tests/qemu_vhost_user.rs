//! `milk-vmm --engine qemu --policy-socket S --api-sock A`: the real guest under QEMU TCG
//! with its virtio-milk rings served by a policy daemon, and a planned swap to another
//! daemon through the control socket (what `milkctl swap --socket NEW` sends) while a
//! workload runs. The daemons run on threads of the test (`milk_policy_daemon::daemon`,
//! what the `milk-policy` binary runs).
//!
//! - `qemu_engine_policy_socket_swap_through_the_control_socket`: exit status 0, the
//!   workload correct, sched_ext enabled once and never disabled, the swap reply carries
//!   the blackout and the handed-over task table, the new daemon continued the session;
//!   `status` and `metrics` report the daemon's counters (read from its stats socket)
//!   before and after the swap, and follow the swap to the new daemon.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use milk_control::client::Client;
use milk_control::proto::Request;
use milk_policy_daemon::backend::{BackendConfig, BackendEvent, MilkBackend};
use milk_policy_daemon::daemon;
use virtio_milk::runtime::RuntimeConfig;

fn daemon_on(sock: &Path) -> JoinHandle<Arc<MilkBackend>> {
    let l = daemon::listen(
        sock,
        BackendConfig {
            num_cpus: 2,
            policy: "fifo".into(),
            runtime: RuntimeConfig::default(),
        },
    )
    .expect("daemon listens");
    std::thread::spawn(move || l.serve_one().expect("daemon serves"))
}

#[test]
fn qemu_engine_policy_socket_swap_through_the_control_socket() {
    // The project's guest, or MILK_VMLINUX / MILK_INITRAMFS (a kernel under test).
    let vmlinux = std::env::var_os("MILK_VMLINUX").map_or_else(
        || {
            milk_guest_kernel::ensure_built()
                .expect("guest kernel")
                .vmlinux
        },
        std::path::PathBuf::from,
    );
    let initrd = std::env::var_os("MILK_INITRAMFS").map_or_else(
        || milk_images::ensure_initramfs().expect("initramfs"),
        std::path::PathBuf::from,
    );
    let dir = tempfile::tempdir().unwrap();
    let (s0, s1, api) = (
        dir.path().join("d0.sock"),
        dir.path().join("d1.sock"),
        dir.path().join("api.sock"),
    );
    let d0 = daemon_on(&s0);
    let script = "i=0;while [ $(cat /sys/kernel/milk/state) != enabled ]&&[ $i -lt 200 ];\
        do usleep 50000;i=$((i+1));done;milk-work -t 32 -r 60 -w 40000 -s 5000;r=$?;\
        for f in enables disables host_goodbyes host_timeouts;\
        do echo MILKC $f=$(cat /sys/kernel/milk/$f);done;exit $r";
    let mut child = Command::new(common::BIN)
        .args(["--kernel", vmlinux.to_str().unwrap()])
        .args(["--initrd", initrd.to_str().unwrap()])
        .args(["--engine", "qemu", "--cpus", "2", "--timeout", "200"])
        .arg("--cmdline")
        .arg(format!("milk.run=\"{script}\""))
        .arg("--policy-socket")
        .arg(&s0)
        .arg("--api-sock")
        .arg(&api)
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .spawn()
        .expect("run milk-vmm");
    let out = child.stdout.take().unwrap();
    let mut console = Vec::new();
    let mut reply = None;
    let mut d1 = None;
    let mut before = None;
    let mut after = None;
    for line in BufReader::new(out).lines().map_while(Result::ok) {
        println!("vm| {line}");
        if line.contains("milk-work: start") && reply.is_none() {
            let mut c = Client::connect(&api, Duration::from_secs(10)).expect("control socket");
            before = Some(c.request(&Request::Status).expect("status reply"));
            d1 = Some(daemon_on(&s1));
            reply = Some(
                c.request(&Request::Swap {
                    policy: None,
                    socket: Some(s1.display().to_string()),
                })
                .expect("swap reply"),
            );
            // The new daemon's runtime publishes its first snapshot within 100 ms.
            std::thread::sleep(Duration::from_millis(500));
            after = Some((
                c.request(&Request::Status).expect("status reply"),
                c.request(&Request::Metrics).expect("metrics reply"),
            ));
        }
        console.push(line);
    }
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0), "{}", console.join("\n"));
    let has = |p: &str| console.iter().any(|l| l.contains(p));
    assert!(has("ok=32 bad=0"), "workload");
    for c in [
        "MILKC enables=1",
        "MILKC disables=0",
        "MILKC host_goodbyes=0",
        "MILKC host_timeouts=0",
    ] {
        assert!(has(c), "{c} missing: sched_ext did not stay enabled");
    }
    let reply = reply.expect("the workload started");
    assert!(reply.ok, "{reply:?}");
    let r = reply.result.unwrap();
    println!("swap reply: {r}");
    let blackout_us = r["blackout_us"].as_u64().unwrap();
    assert!(blackout_us < 250_000, "{r}");
    assert!(r["tasks"].as_u64().unwrap() > 32, "{r}");
    // status: the daemon's counters, before and after the swap.
    let before = before.expect("status before the swap");
    assert!(before.ok, "{before:?}");
    let b = before.result.unwrap();
    println!("status before the swap: {b}");
    assert_eq!(b["engine"], "qemu", "{b}");
    assert_eq!(b["state"], "running", "{b}");
    assert_eq!(b["policy"], "fifo", "{b}");
    assert_eq!(b["daemon"]["socket"], s0.display().to_string(), "{b}");
    assert_eq!(
        b["daemon"]["pid"],
        std::process::id(),
        "daemons run in the test: {b}"
    );
    assert_eq!(b["daemon"]["swaps"], 0, "{b}");
    assert_eq!(b["session_established"], true, "{b}");
    assert!(b["counters"]["decisions_run"].as_u64().unwrap() > 0, "{b}");
    assert!(b["counters"]["acks"]["ok"].as_u64().unwrap() > 0, "{b}");
    assert_eq!(b["counters"]["malformed"], 0, "{b}");
    let (st, m) = after.expect("status after the swap");
    assert!(st.ok && m.ok, "{st:?} {m:?}");
    let (st, m) = (st.result.unwrap(), m.result.unwrap());
    println!("status after the swap: {st}\nmetrics after the swap: {m}");
    assert_eq!(st["state"], "running", "{st}");
    assert_eq!(st["daemon"]["socket"], s1.display().to_string(), "{st}");
    assert_eq!(st["daemon"]["swaps"], 1, "{st}");
    assert_eq!(
        st["session_id"], b["session_id"],
        "the session continued: {st}"
    );
    assert!(st["counters"].is_object(), "{st}");
    assert_eq!(m["daemon"]["socket"], s1.display().to_string(), "{m}");
    assert_eq!(m["session_id"], b["session_id"], "{m}");
    assert!(m["latency"]["event_to_decision"].is_object(), "{m}");
    assert!(m["messages_by_type"].is_object(), "{m}");
    // The old daemon left after the swap; the new one continued the session.
    let b0 = d0.join().unwrap();
    assert!(matches!(
        b0.events().last(),
        Some(BackendEvent::Stopped { .. })
    ));
    let b1 = d1.unwrap().join().unwrap();
    assert!(
        matches!(
            b1.events().first(),
            Some(BackendEvent::Started { resumed: true, .. })
        ),
        "{:?}",
        b1.events()
    );
    let runs = b1.summaries();
    assert!(runs[0].metrics.decisions_run > 0, "{}", runs[0]);
    assert_eq!(runs[0].engine.malformed_total(), 0);
}
