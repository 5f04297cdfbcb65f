//! The control socket against well-behaved and hostile clients, with a real virtio-milk
//! device (runtime thread on loopback queues) behind it.

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use milk_control::proto::MAX_LINE;
use milk_control::{Client, ControlServer, Request, VmControl};
use virtio_milk::control::{MilkControl, PolicyControl};
use virtio_milk::device::{Activation, MilkDevice};
use virtio_milk::loopback::LoopbackMemory;
use virtio_milk::protocol::VIRTIO_F_VERSION_1;
use virtio_milk::runtime::RuntimeConfig;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

struct Rig {
    _lm: LoopbackMemory,
    dev: MilkControl<GuestMemoryMmap>,
    stops: Arc<AtomicUsize>,
    server: ControlServer,
    _dir: tempfile::TempDir,
}

fn rig(activate: bool) -> Rig {
    let lm = LoopbackMemory::new(2, 16, 256).unwrap();
    let p = milk_policies::resolve("fifo").unwrap();
    let dev = MilkControl::new(
        MilkDevice::with_policy(2, &p.spec, p.factory, RuntimeConfig::default()).unwrap(),
    );
    if activate {
        dev.activate(Activation {
            memory: lm.mem.clone(),
            features: 1 << VIRTIO_F_VERSION_1,
            queues: lm.queues.clone(),
            kicks: vec![EventFd::new(EFD_NONBLOCK).unwrap()],
            interrupt: Box::new(|_q: u16| Ok(())),
            ring_state: None,
        })
        .unwrap();
    }
    let stops = Arc::new(AtomicUsize::new(0));
    let s2 = stops.clone();
    let vm = Arc::new(VmControl::new(
        "test",
        Some(Arc::new(dev.clone()) as Arc<dyn PolicyControl>),
        Box::new(move || {
            s2.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }),
    ));
    let dir = tempfile::tempdir().unwrap();
    let server = ControlServer::bind(&dir.path().join("api.sock"), vm).unwrap();
    Rig {
        _lm: lm,
        dev,
        stops,
        server,
        _dir: dir,
    }
}

fn client(path: &Path) -> Client {
    Client::connect(path, Duration::from_secs(10)).unwrap()
}

fn ask(path: &Path, req: &Request) -> milk_control::Reply {
    client(path).request(req).unwrap()
}

#[test]
fn socket_is_private_and_removed_at_the_end() {
    let r = rig(false);
    let path = r.server.path().to_owned();
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "mode {mode:o}");
    // A second server on a live socket is refused; the first keeps serving.
    let vm = Arc::new(VmControl::new("test", None, Box::new(|| Ok(()))));
    assert!(ControlServer::bind(&path, vm.clone()).is_err());
    assert!(ask(&path, &Request::Status).ok);
    let dir = tempfile::tempdir().unwrap();
    let keep = dir.path().join("keep.sock");
    let s = ControlServer::bind(&keep, vm.clone()).unwrap();
    drop(s);
    assert!(!keep.exists(), "socket file removed");
    drop(r);
    // A stale socket (its server died without removing it) is taken over.
    let path = dir.path().join("stale.sock");
    let l = std::os::unix::net::UnixListener::bind(&path).unwrap();
    drop(l);
    assert!(path.exists());
    let s = ControlServer::bind(&path, vm).unwrap();
    assert!(ask(&path, &Request::Status).ok);
    drop(s);
}

#[test]
fn status_policies_metrics_and_swap() {
    let r = rig(true);
    let p = r.server.path();
    let st = ask(p, &Request::Status);
    assert!(st.ok, "{st:?}");
    let v = st.result.unwrap();
    assert_eq!(v["engine"], "test");
    assert_eq!(v["state"], "running");
    assert_eq!(v["policy"], "fifo");
    assert_eq!(v["boot_id"].as_str().unwrap().len(), 32);
    let pol = ask(p, &Request::Policies).result.unwrap();
    assert!(pol["policies"]
        .as_array()
        .unwrap()
        .iter()
        .any(|x| x["name"] == "fifo"));
    // Counters appear within a snapshot period.
    r.dev
        .wait_for(Duration::from_secs(5), |_| true)
        .expect("live counters");
    let m = ask(p, &Request::Metrics).result.unwrap();
    assert_eq!(m["policy"], "fifo");
    assert!(m["latency"]["event_to_decision"]["count"].is_u64());
    assert!(m["counters"]["decisions_run"].is_u64());

    let sw = ask(
        p,
        &Request::Swap {
            policy: Some("fifo:slice_us=700".into()),
            socket: None,
        },
    );
    assert!(sw.ok, "{sw:?}");
    let v = sw.result.unwrap();
    assert_eq!(v["from"], "fifo");
    assert_eq!(v["to"], "fifo:slice_us=700");
    assert_eq!(v["swapped_live"], true);
    assert_eq!(r.dev.policy(), "fifo:slice_us=700");
    let s = r
        .dev
        .wait_for(Duration::from_secs(5), |s| s.metrics.policy_swaps == 1)
        .expect("the runtime swapped");
    assert_eq!(s.policy, "fifo");
    // Cross-process swap needs a vhost-user frontend this VM lacks.
    let sock = ask(
        p,
        &Request::Swap {
            policy: None,
            socket: Some("/nonexistent".into()),
        },
    );
    assert!(!sock.ok && sock.error.unwrap().contains("vhost-user"));
}

#[test]
fn pause_stops_the_runtime_and_resume_keeps_the_swapped_policy() {
    let r = rig(true);
    let p = r.server.path();
    let sw = ask(
        p,
        &Request::Swap {
            policy: Some("fifo:slice_us=900".into()),
            socket: None,
        },
    );
    assert!(sw.ok);
    let v = ask(p, &Request::Pause).result.unwrap();
    assert_eq!(v["paused"], true);
    assert_eq!(v["state"], "paused");
    assert!(!r.dev.is_running());
    assert_eq!(ask(p, &Request::Pause).result.unwrap()["paused"], false);
    assert_eq!(ask(p, &Request::Status).result.unwrap()["state"], "paused");
    let v = ask(p, &Request::Resume).result.unwrap();
    assert_eq!(v["resumed"], true);
    assert_eq!(
        v["policy"], "fifo:slice_us=900",
        "the swap survived the pause"
    );
    assert!(r.dev.is_running());
    assert_eq!(
        r.dev.summaries().len(),
        1,
        "one runtime run ended (the pause)"
    );
}

#[test]
fn pause_and_resume_need_an_active_device() {
    let r = rig(false);
    let p = r.server.path();
    for req in [Request::Pause, Request::Resume] {
        let rep = ask(p, &req);
        assert!(!rep.ok);
        assert!(rep.error.unwrap().contains("not started"));
    }
}

#[test]
fn bad_requests_get_errors_and_change_nothing() {
    let r = rig(true);
    let p = r.server.path();
    let mut c = client(p);
    for (line, why) in [
        ("{not json", "malformed JSON"),
        ("{\"cmd\":\"reboot\"}", "unknown command"),
        ("{\"nocmd\":1}", "no \"cmd\""),
        ("{\"cmd\":\"swap\",\"policy\":\"nope\"}", "unknown policy"),
        ("{\"cmd\":\"swap\",\"policy\":\"fifo:bogus=1\"}", "bogus"),
        ("{\"cmd\":\"swap\"}", "needs a policy"),
        ("{\"cmd\":\"pause\",\"now\":true}", "unknown field"),
        ("", "empty request"),
    ] {
        let rep = c.raw(line).unwrap();
        assert!(!rep.ok, "{line}");
        let e = rep.error.unwrap();
        assert!(e.contains(why), "{line}: {e}");
    }
    assert_eq!(r.dev.policy(), "fifo");
    assert!(r.dev.is_running());
    assert_eq!(r.stops.load(Ordering::SeqCst), 0);
    // The same connection still works after the errors.
    assert!(c.request(&Request::Status).unwrap().ok);

    // An oversized line: error, connection closed, nothing carried out.
    let mut s = UnixStream::connect(p).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    drop(c);
    let big = format!(
        "{{\"cmd\":\"stop\",\"pad\":\"{}\"}}\n",
        "x".repeat(MAX_LINE)
    );
    let _ = s.write_all(big.as_bytes());
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    assert!(out.contains("longer than 4096 bytes"), "{out}");
    assert_eq!(
        r.stops.load(Ordering::SeqCst),
        0,
        "the stop was not carried out"
    );
    assert!(ask(p, &Request::Status).ok, "the server still serves");
}

#[test]
fn second_client_is_refused_and_a_vanishing_client_is_survived() {
    let r = rig(true);
    let p = r.server.path();
    // The first client is mid-request (half a line sent).
    let mut first = UnixStream::connect(p).unwrap();
    first.write_all(b"{\"cmd\":\"sto").unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let mut second = client(p);
    let rep = second.request(&Request::Stop);
    match rep {
        Ok(rep) => {
            assert!(!rep.ok);
            assert!(rep.error.unwrap().contains("busy"));
        }
        Err(e) => panic!("the second client got no error reply: {e}"),
    }
    // The first client vanishes mid-request: its half request is never carried out.
    drop(first);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(r.stops.load(Ordering::SeqCst), 0);
    assert!(r.dev.is_running());
    // And the next client is served.
    let rep = ask(p, &Request::Stop);
    assert!(rep.ok);
    assert_eq!(r.stops.load(Ordering::SeqCst), 1);
    let again = ask(p, &Request::Stop).result.unwrap();
    assert_eq!(again["already"], true);
    assert_eq!(r.stops.load(Ordering::SeqCst), 1, "stop runs once");
}

#[test]
fn a_vm_without_policy_answers_status_and_refuses_policy_requests() {
    let dir = tempfile::tempdir().unwrap();
    let vm = Arc::new(VmControl::new("qemu", None, Box::new(|| Ok(()))));
    let s = ControlServer::bind(&dir.path().join("a/b.sock"), vm).unwrap();
    let st = ask(s.path(), &Request::Status).result.unwrap();
    assert_eq!(st["state"], "none");
    let m = ask(s.path(), &Request::Metrics);
    assert!(!m.ok && m.error.unwrap().contains("without --policy"));
    let mode = std::fs::metadata(dir.path().join("a"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o700, "a created socket directory is private");
}

/// Clients that hang up before reading their reply (a full request sent; `metrics` has the
/// largest reply) or in the middle of a line, one after another: the server survives each,
/// carries out no half request, and the next client is served on the same state.
#[test]
fn clients_hanging_up_mid_request_or_before_the_reply_are_survived() {
    let r = rig(true);
    let p = r.server.path();
    for i in 0..10 {
        let mut s = UnixStream::connect(p).unwrap();
        s.write_all(b"{\"cmd\":\"metrics\"}\n").unwrap();
        drop(s);
        let mut s = UnixStream::connect(p).unwrap();
        let half: &[u8] = b"{\"cmd\":\"swap\",\"policy\":\"rr\"}";
        s.write_all(&half[..half.len() * (i + 1) / 11]).unwrap();
        drop(s);
    }
    // The half swaps never ran; a full one still does.
    let st = ask(p, &Request::Status).result.unwrap();
    assert_eq!(st["policy"], "fifo", "{st}");
    assert_eq!(st["state"], "running", "{st}");
    assert_eq!(r.dev.policy(), "fifo");
    let sw = ask(
        p,
        &Request::Swap {
            policy: Some("rr".into()),
            socket: None,
        },
    );
    assert!(sw.ok, "{sw:?}");
    assert_eq!(r.dev.policy(), "rr");
    assert_eq!(r.stops.load(Ordering::SeqCst), 0);
}

/// A policy served by another process as `status` / `metrics` report it, for each state
/// the frontend can be in (milk-vmm's `RemoteDaemon` gives the real ones).
struct FakeRemote(std::sync::Mutex<milk_control::RemoteStatus>);

impl milk_control::RemotePolicy for FakeRemote {
    fn swap_to_socket(&self, socket: &str) -> Result<serde_json::Value, String> {
        Ok(serde_json::json!({ "socket": socket }))
    }
    fn status(&self) -> milk_control::RemoteStatus {
        self.0.lock().unwrap().clone()
    }
}

#[test]
fn a_remote_policy_reports_the_daemon_counters() {
    use milk_control::RemoteStatus;
    use serde_json::json;
    let dir = tempfile::tempdir().unwrap();
    let vm = Arc::new(VmControl::new("kvm", None, Box::new(|| Ok(()))));
    let remote = Arc::new(FakeRemote(std::sync::Mutex::new(RemoteStatus {
        state: "inactive".into(),
        daemon: serde_json::Value::Null,
        stats: None,
    })));
    vm.set_remote(remote.clone());
    let s = ControlServer::bind(&dir.path().join("api.sock"), vm).unwrap();
    let st = ask(s.path(), &Request::Status).result.unwrap();
    assert_eq!(st["state"], "inactive", "{st}");
    assert!(st.get("counters").is_none(), "{st}");
    assert_eq!(ask(s.path(), &Request::Metrics).result.unwrap()["runs"], 0);

    let daemon = json!({"socket": "/run/a.sock", "pid": 77, "connected": true, "hangups": 1,
        "reconnects": 1, "swaps": 2});
    let run = json!({"policy": "fifo", "run_elapsed_ms": 5, "session_id": 9,
        "session_established": true, "tasks": 12, "counters": {"messages": 40},
        "latency": {"event_to_decision": {"count": 3}}});
    *remote.0.lock().unwrap() = RemoteStatus {
        state: "running".into(),
        daemon: daemon.clone(),
        stats: Some(
            json!({"pid": 77, "policy": "fifo", "cpus": 2, "state": "running",
            "runs": 1, "ended_runs": 0, "ended_runs_ms": 0, "run": run}),
        ),
    };
    let st = ask(s.path(), &Request::Status).result.unwrap();
    assert_eq!(st["engine"], "kvm");
    assert_eq!(st["state"], "running");
    assert_eq!(
        (st["policy"].as_str(), st["cpus"].as_u64()),
        (Some("fifo"), Some(2))
    );
    assert_eq!(
        (st["session_id"].as_u64(), st["tasks"].as_u64()),
        (Some(9), Some(12))
    );
    assert_eq!(st["counters"]["messages"], 40);
    assert_eq!(st["daemon"], daemon);
    let m = ask(s.path(), &Request::Metrics).result.unwrap();
    assert_eq!(m["state"], "running");
    assert_eq!(m["counters"]["messages"], 40);
    assert_eq!(m["latency"]["event_to_decision"]["count"], 3);
    assert_eq!(m["daemon"]["pid"], 77);

    // The daemon hung up: the frontend's numbers, no counters.
    *remote.0.lock().unwrap() = RemoteStatus {
        state: "disconnected".into(),
        daemon: json!({"socket": "/run/a.sock", "connected": false}),
        stats: None,
    };
    let st = ask(s.path(), &Request::Status).result.unwrap();
    assert_eq!(st["state"], "disconnected");
    assert!(st.get("counters").is_none(), "{st}");
    // pause/resume say why they cannot work; swap --socket reaches the remote.
    let e = ask(s.path(), &Request::Pause).error.unwrap();
    assert!(e.contains("milk-policy daemon"), "{e}");
    let sw = ask(
        s.path(),
        &Request::Swap {
            policy: None,
            socket: Some("/run/b.sock".into()),
        },
    );
    assert_eq!(sw.result.unwrap()["socket"], "/run/b.sock");
}
