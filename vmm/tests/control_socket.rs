//! milk-vmm's control socket (`--api-sock`) on a running VM, with both engines:
//!
//! - KVM: the freestanding test guest (`testguest.linger`) does the virtio-milk round
//!   trip and keeps the device running; the socket reports engine kvm, swaps the policy
//!   live, pauses and resumes the runtime (the swap survives), refuses bad requests and
//!   stops the VM (exit 0, summaries printed, socket removed).
//! - QEMU: the real guest under milk-vmm's QEMU engine: `pause` puts the guest back on
//!   CFS (its bridge reports sched_ext disabled), `resume` re-enables it with the swapped
//!   policy, the workload completes, `stop` ends the VM.
//!
//! Requests go through `milk_control::Client`, what milkctl uses (milkctl itself is
//! tested in `control/tests/milkctl.rs`).

mod common;

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::BIN;
use milk_control::{Client, Reply, Request};
use serde_json::Value;

/// milk-vmm running with its stdout lines on a channel.
struct Vmm {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Vmm {
    fn spawn(args: &[&str]) -> Self {
        let mut child = Command::new(BIN)
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start milk-vmm");
        let out = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        Vmm {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits for a stdout line containing `needle` (starting with it, for `CTL-` markers,
    /// which the kernel's command line echo also contains).
    fn wait_line(&mut self, needle: &str, timeout: Duration) -> String {
        let end = Instant::now() + timeout;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    self.seen.push(l.clone());
                    let hit = if needle.starts_with("CTL-") {
                        l.starts_with(needle)
                    } else {
                        l.contains(needle)
                    };
                    if hit {
                        return l;
                    }
                }
                Err(_) => panic!(
                    "no line with {needle:?} within {timeout:?}; stdout so far:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }

    /// Waits for the exit; returns (code, rest of stdout, stderr).
    fn wait_exit(mut self, timeout: Duration) -> (Option<i32>, String, String) {
        let end = Instant::now() + timeout;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                let mut rest = self.seen.join("\n");
                while let Ok(l) = self.lines.recv_timeout(Duration::from_secs(2)) {
                    rest.push('\n');
                    rest.push_str(&l);
                }
                let mut err = String::new();
                if let Some(mut e) = self.child.stderr.take() {
                    let _ = std::io::Read::read_to_string(&mut e, &mut err);
                }
                return (st.code(), rest, err);
            }
            if Instant::now() > end {
                let _ = self.child.kill();
                panic!("milk-vmm did not exit within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_socket(p: &Path) {
    let end = Instant::now() + Duration::from_secs(60);
    while !p.exists() {
        assert!(Instant::now() < end, "no control socket at {}", p.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn ask(sock: &Path, req: Request) -> Reply {
    Client::connect(sock, Duration::from_secs(30))
        .and_then(|mut c| c.request(&req))
        .unwrap_or_else(|e| panic!("{}: {e}", req.name()))
}

fn ok(sock: &Path, req: Request) -> Value {
    let name = req.name();
    let r = ask(sock, req);
    assert!(r.ok, "{name}: {r:?}");
    r.result.unwrap()
}

fn swap(spec: &str) -> Request {
    Request::Swap {
        policy: Some(spec.into()),
        socket: None,
    }
}

#[test]
fn kvm_engine_status_swap_pause_resume_stop() {
    assert!(common::kvm_usable(), "/dev/kvm is needed for this test");
    let k = common::test_guest("pvh");
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    let mut vmm = Vmm::spawn(&[
        "--kernel",
        k.to_str().unwrap(),
        "--engine",
        "kvm",
        "--policy",
        "fifo",
        "--timeout",
        "120",
        "--cmdline",
        "testguest.linger",
        "--api-sock",
        sock.to_str().unwrap(),
    ]);
    vmm.wait_line("milk: lingering", Duration::from_secs(60));
    wait_socket(&sock);
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);

    let st = ok(&sock, Request::Status);
    assert_eq!(st["engine"], "kvm");
    assert_eq!(st["state"], "running");
    assert_eq!(st["policy"], "fifo");
    assert_eq!(st["cpus"], 1);
    let boot = st["boot_id"].as_str().unwrap().to_owned();

    // Bad requests change nothing.
    let bad = ask(&sock, swap("nope"));
    assert!(!bad.ok && bad.error.unwrap().contains("unknown policy"));
    let mut c = Client::connect(&sock, Duration::from_secs(10)).unwrap();
    assert!(!c.raw("{\"cmd\":").unwrap().ok);
    drop(c);

    // Clients that hang up mid-line or before reading their reply: milk-vmm keeps
    // running (no SIGPIPE death), the half requests never run, nothing changed.
    for _ in 0..5 {
        use std::io::Write;
        let mut u = std::os::unix::net::UnixStream::connect(&sock).unwrap();
        u.write_all(b"{\"cmd\":\"stop\"").unwrap();
        drop(u);
        let mut u = std::os::unix::net::UnixStream::connect(&sock).unwrap();
        u.write_all(b"{\"cmd\":\"metrics\"}\n").unwrap();
        drop(u);
    }
    std::thread::sleep(Duration::from_millis(600));
    let st = ok(&sock, Request::Status);
    assert_eq!(
        (st["state"].as_str(), st["policy"].as_str()),
        (Some("running"), Some("fifo"))
    );
    assert_eq!(st["boot_id"], boot.as_str());
    assert!(
        vmm.child.try_wait().unwrap().is_none(),
        "milk-vmm still runs"
    );

    let sw = ok(&sock, swap("fifo:slice_us=500"));
    assert_eq!(sw["swapped_live"], true);
    let p = ok(&sock, Request::Pause);
    assert_eq!(p["state"], "paused");
    assert_eq!(ok(&sock, Request::Status)["state"], "paused");
    let r = ok(&sock, Request::Resume);
    assert_eq!(r["state"], "running");
    assert_eq!(
        r["policy"], "fifo:slice_us=500",
        "the swap survived the pause"
    );
    let st = ok(&sock, Request::Status);
    assert_eq!(st["boot_id"], boot.as_str(), "same boot");
    assert_eq!(st["runs"], 2);
    let m = ok(&sock, Request::Metrics);
    assert_eq!(m["ended_runs"], 1);

    ok(&sock, Request::Stop);
    let (code, stdout, stderr) = vmm.wait_exit(Duration::from_secs(60));
    assert_eq!(code, Some(0), "{stdout}\n{stderr}");
    assert!(stderr.contains("stopped on request"), "{stderr}");
    assert!(
        stderr.contains(&format!("control socket {}", sock.display())),
        "path printed at start: {stderr}"
    );
    assert!(!sock.exists(), "socket removed at exit");
    // One summary per runtime run: the paused one and the one the stop ended.
    assert_eq!(
        stdout.matches("virtio-milk summary: policy fifo").count(),
        2,
        "{stdout}"
    );
}

#[test]
fn explicit_socket_path_that_cannot_be_bound_is_a_usage_error() {
    let k = common::test_guest("pvh");
    let dir = tempfile::tempdir().unwrap();
    let taken = dir.path().join("file");
    std::fs::write(&taken, b"not a socket").unwrap();
    let out = common::run(&[
        "--kernel",
        k.to_str().unwrap(),
        "--engine",
        "kvm",
        "--api-sock",
        taken.to_str().unwrap(),
        "--timeout",
        "30",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(stderr.contains("in use"), "{stderr}");
    assert_eq!(std::fs::read(&taken).unwrap(), b"not a socket");
}

/// The project's `vmlinux` and initramfs (or `MILK_VMLINUX` / `MILK_INITRAMFS`).
fn guest_files() -> (std::path::PathBuf, std::path::PathBuf) {
    let k = match std::env::var("MILK_VMLINUX") {
        Ok(p) => p.into(),
        Err(_) => {
            milk_guest_kernel::ensure_built()
                .expect("guest kernel builds")
                .vmlinux
        }
    };
    let i = match std::env::var("MILK_INITRAMFS") {
        Ok(p) => p.into(),
        Err(_) => milk_images::ensure_initramfs().expect("initramfs builds"),
    };
    (k, i)
}

#[test]
fn qemu_engine_pause_falls_back_to_cfs_and_resume_reenables() {
    assert!(
        milk_harness::qemu_available(),
        "qemu-system-x86_64 is needed for the QEMU engine"
    );
    let (kernel, initrd) = guest_files();
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    // Wait for milk, report, then a workload long enough to pause and resume under;
    // afterwards report the state again and idle until stopped.
    let script = "i=0;while [ $(cat /sys/kernel/milk/state) != enabled ]&&[ $i -lt 200 ];\
        do usleep 50000;i=$((i+1));done;echo CTL-READY;\
        milk-mon -i 10 & milk-work -t 16 -r 60 -w 20000 -s 2000;echo CTL-WORK $?;\
        echo CTL-END $(cat /sys/kernel/sched_ext/state) $(cat /sys/kernel/milk/enables);\
        sleep 600";
    let cmdline = format!("milk.run=\"{script}\"");
    let mut vmm = Vmm::spawn(&[
        "--kernel",
        kernel.to_str().unwrap(),
        "--initrd",
        initrd.to_str().unwrap(),
        "--engine",
        "qemu",
        "--policy",
        "fifo",
        "--cpus",
        "2",
        "--timeout",
        "400",
        "--api-sock",
        sock.to_str().unwrap(),
        "--cmdline",
        &cmdline,
    ]);
    vmm.wait_line("CTL-READY", Duration::from_secs(200));
    let st = ok(&sock, Request::Status);
    assert_eq!(st["engine"], "qemu");
    assert_eq!(st["state"], "running");
    assert_eq!(st["session_established"], true, "{st}");
    vmm.wait_line("milk-work: start", Duration::from_secs(60));
    assert_eq!(ok(&sock, swap("fifo:slice_us=3000"))["swapped_live"], true);
    let t = Instant::now();
    assert_eq!(ok(&sock, Request::Pause)["paused"], true);
    vmm.wait_line("scx=disabled", Duration::from_secs(30));
    let fallback = t.elapsed();
    let r = ok(&sock, Request::Resume);
    assert_eq!(r["policy"], "fifo:slice_us=3000");
    vmm.wait_line("scx=enabled", Duration::from_secs(30));
    let done = vmm.wait_line("CTL-WORK", Duration::from_secs(300));
    assert_eq!(
        done.trim(),
        "CTL-WORK 0",
        "the workload completed correctly"
    );
    let end = vmm.wait_line("CTL-END", Duration::from_secs(30));
    assert!(end.contains("CTL-END enabled"), "back on milk: {end}");
    let m = ok(&sock, Request::Metrics);
    assert_eq!(m["policy"], "fifo");
    assert!(m["counters"]["decisions_run"].as_u64().unwrap() > 0, "{m}");
    assert_eq!(m["ended_runs"], 1);
    println!("pause -> guest saw sched_ext disabled after {fallback:?} (host clock)");
    ok(&sock, Request::Stop);
    let (code, stdout, stderr) = vmm.wait_exit(Duration::from_secs(60));
    assert_eq!(code, Some(0), "{stdout}\n{stderr}");
    assert!(stderr.contains("stopped on request"), "{stderr}");
    assert_eq!(
        stdout.matches("virtio-milk summary: policy fifo").count(),
        2,
        "{stdout}"
    );
    assert!(!sock.exists());
    common::assert_no_leftovers(dir.path());
}
