//! Out-of-process policies end to end under QEMU TCG: the real guest (Linux 6.12, the
//! virtio-over-ivshmem transport, virtio_milk, the sched_ext bridge) with its virtio-milk
//! rings served by `milk-policy` daemons (child processes) over vhost-user, through the
//! QEMU engine's backend (`milk_policy_daemon::ivshmem`): guest-RAM file, ring addresses,
//! ivshmem doorbell eventfds as kicks and the guest's MSI-X eventfds as calls.
//!
//! - `five_planned_swaps_during_a_workload_keep_sched_ext_enabled`: 5 swaps to new daemons
//!   while a 64-thread workload runs, then a 6th at the end whose handed-over task table
//!   is compared with the guest's task count; one boot, no fallback, workload correct.
//! - `three_kill_9_of_the_daemon_fall_back_and_reconnect`: the daemon is SIGKILLed 3
//!   times mid-workload; each time the guest is on CFS within 1 s, a restarted daemon on
//!   the same socket is reconnected and the guest re-enables milk; workload correct.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::Daemon;
use milk_harness::{GuestOutcome, GuestSpec};
use milk_ivshmem::transport::{IvshmemTransport, TransportConfig};
use milk_policy_daemon::frontend::{FrontendSlot, SwapReport};
use milk_policy_daemon::ivshmem::VhostUserIvshmem;

const CPUS: u32 = 2;

/// Waits (up to 10 s) until the bridge reports `enabled`.
const WAIT_ENABLED: &str = "W(){ i=0;while [ $(cat /sys/kernel/milk/state) != enabled ]\
&&[ $i -lt 200 ];do usleep 50000;i=$((i+1));done; };";

/// Prints every bridge counter as `MILKC name=value`.
const PRINT_COUNTERS: &str = "for f in /sys/kernel/milk/*;do echo MILKC ${f##*/}=$(cat $f);done;";

/// Threads sched_ext schedules (policies NORMAL, BATCH, IDLE) as `TASKS pid...`; the
/// list includes the counting processes themselves (a subshell, cat, awk).
const COUNT_TASKS: &str = "n=$(cat /proc/[0-9]*/task/[0-9]*/stat 2>/dev/null|awk \
'{p=$1;sub(/^.*\\) /,X);if($39==0||$39==3||$39==5)s=s FS p}END{print s}');echo TASKS $n;";

/// One guest at a time (two TCG guests on two cores would distort the timings).
static ONE_GUEST: Mutex<()> = Mutex::new(());

/// The project's guest, or `MILK_VMLINUX` / `MILK_INITRAMFS` (a kernel under test).
fn spec(script: &str) -> GuestSpec {
    let (vmlinux, initrd) = match (
        std::env::var_os("MILK_VMLINUX"),
        std::env::var_os("MILK_INITRAMFS"),
    ) {
        (Some(k), Some(i)) => (PathBuf::from(k), PathBuf::from(i)),
        (k, i) => {
            let g = milk_tests::guest();
            (
                k.map_or(g.kernel.vmlinux, PathBuf::from),
                i.map_or(g.initrd, PathBuf::from),
            )
        }
    };
    let mut spec = GuestSpec::new(&vmlinux);
    spec.initrd = Some(initrd);
    spec.cpus = CPUS;
    spec.timeout = Duration::from_secs(240);
    spec.cmdline = format!("milk.run=\"{script}\"");
    assert!(
        !script.contains('"'),
        "/init ends milk.run at a double quote"
    );
    assert!(spec.full_cmdline().len() < 2048, "guest script too long");
    spec
}

/// Boots `spec` with the rings served by the daemon at `sock`; `on_line` gets every
/// console line and the frontend handle.
fn run(
    spec: &GuestSpec,
    dir: &Path,
    sock: &Path,
    on_line: &mut dyn FnMut(&str, &FrontendSlot),
) -> (GuestOutcome, FrontendSlot) {
    let _ = env_logger::builder().is_test(true).try_init();
    let backend = VhostUserIvshmem::new(sock, CPUS).expect("daemon reachable");
    let slot = backend.handle();
    let info = backend.device_info();
    let cfg = TransportConfig::in_dir(dir, spec.memory_mib, info);
    let transport = IvshmemTransport::new(cfg, backend).expect("transport");
    let mut spec = spec.clone();
    transport.qemu_args().apply(&mut spec);
    let running = transport.spawn().expect("transport thread");
    let s2 = slot.clone();
    let out = milk_harness::run_qemu(&spec, &mut |l| {
        println!("guest| {l}");
        on_line(l, &s2)
    });
    // Events before the reset at the end drops the frontend.
    let mut t = running.stop().expect("transport stops");
    t.device_mut().disconnect();
    (out.expect("guest ran to its end"), slot)
}

/// `line` from `marker` on: a kernel message may share the console line with the
/// workload's output.
fn from<'a>(line: &'a str, marker: &str) -> Option<&'a str> {
    line.find(marker).map(|i| &line[i..])
}

fn fields(line: &str) -> HashMap<String, String> {
    line.split_whitespace()
        .filter_map(|w| w.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

fn counters(out: &GuestOutcome) -> HashMap<String, u64> {
    out.console
        .iter()
        .filter_map(|l| from(l, "MILKC ").map(|m| &m[6..]))
        .filter_map(|w| w.split_once('='))
        .filter_map(|(k, v)| v.trim().parse().ok().map(|n| (k.to_owned(), n)))
        .collect()
}

fn count_lines(out: &GuestOutcome, pat: &str) -> usize {
    out.console.iter().filter(|l| l.contains(pat)).count()
}

/// The workload's one summary line: 64 threads, all correct.
fn assert_workload_ok(out: &GuestOutcome) {
    let w: Vec<_> = out
        .console
        .iter()
        .filter_map(|l| from(l, "milk-work: threads="))
        .map(fields)
        .collect();
    assert_eq!(w.len(), 1, "{w:?}");
    assert_eq!(w[0]["ok"], "64", "{w:?}");
    assert_eq!(w[0]["bad"], "0", "{w:?}");
    assert_eq!(out.result.map(|r| r.status), Some(0));
}

fn assert_one_boot(out: &GuestOutcome) {
    assert_eq!(count_lines(out, "Linux version"), 1, "the guest rebooted");
    assert_eq!(count_lines(out, "MILK-BOOT "), 1, "the guest rebooted");
}

#[test]
fn five_planned_swaps_during_a_workload_keep_sched_ext_enabled() {
    let _one = ONE_GUEST.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let sock0 = dir.path().join("d0.sock");
    let first = Daemon::start(&sock0, CPUS as u16);
    let script = format!(
        "{WAIT_ENABLED}W;milk-mon -i 10 & m=$!;milk-work -t 64 -r 400 -w 40000 -s 5000;r=$?;\
         usleep 200000;{COUNT_TASKS}usleep 1000000;echo COUNTED;usleep 1500000;kill $m;{PRINT_COUNTERS}exit $r"
    );
    let spec = spec(&script);
    let daemons: Arc<Mutex<Vec<Daemon>>> = Arc::new(Mutex::new(vec![first]));
    let reports: Arc<Mutex<Vec<SwapReport>>> = Arc::default();
    // Set when the workload's summary line appears: every swap must come before it.
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let late_swaps = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut swapper = None;
    let mut guest_tasks = None;
    let mut final_report = None;
    let mut final_status = None;
    let (out, _slot) = run(&spec, dir.path(), &sock0, &mut |l, slot| {
        if l.contains("milk-work: start") && swapper.is_none() {
            let (slot, daemons, reports) = (slot.clone(), daemons.clone(), reports.clone());
            let (done, late) = (done.clone(), late_swaps.clone());
            let dir: PathBuf = dir.path().to_owned();
            swapper = Some(std::thread::spawn(move || {
                for i in 1..=5 {
                    std::thread::sleep(Duration::from_millis(300));
                    let p = dir.join(format!("d{i}.sock"));
                    let d = Daemon::start(&p, CPUS as u16);
                    let r = slot.swap(&p).expect("planned swap");
                    if done.load(std::sync::atomic::Ordering::Acquire) {
                        late.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
                    }
                    println!(
                        "swap {i}: blackout {:?} prepare {:?} state {} B, {} tasks, rings {:?}",
                        r.blackout,
                        r.prepare,
                        r.state_bytes,
                        r.pids.len(),
                        r.bases
                    );
                    reports.lock().unwrap().push(r);
                    daemons.lock().unwrap().push(d);
                }
            }));
        } else if l.contains("milk-work: threads=") {
            done.store(true, std::sync::atomic::Ordering::Release);
        } else if let Some(n) = from(l, "TASKS ").map(|m| &m[6..]) {
            guest_tasks = Some(
                n.split_whitespace()
                    .filter_map(|p| p.parse::<u32>().ok())
                    .collect::<std::collections::BTreeSet<u32>>(),
            );
        } else if l.contains("COUNTED") {
            // The guest is idle now: one more swap hands the host's task table over.
            let p = dir.path().join("final.sock");
            let d = Daemon::start(&p, CPUS as u16);
            final_report = slot.swap(&p).ok();
            final_status = slot.status();
            daemons.lock().unwrap().push(d);
        }
    });
    if let Some(t) = swapper {
        t.join().expect("swapper");
    }
    assert_workload_ok(&out);
    assert_one_boot(&out);
    let c = counters(&out);
    assert_eq!(c.get("enables"), Some(&1), "{c:?}");
    assert_eq!(c.get("disables"), Some(&0), "sched_ext was disabled: {c:?}");
    assert_eq!(c.get("host_goodbyes"), Some(&0), "{c:?}");
    assert_eq!(c.get("host_timeouts"), Some(&0), "{c:?}");
    assert_eq!(c.get("bad_records"), Some(&0), "{c:?}");
    assert_eq!(
        count_lines(&out, "scx=disabled"),
        0,
        "milk-mon saw sched_ext disabled"
    );
    let reports = reports.lock().unwrap().clone();
    assert_eq!(reports.len(), 5);
    assert_eq!(
        late_swaps.load(std::sync::atomic::Ordering::Acquire),
        0,
        "every swap happened during the workload"
    );
    let end = out
        .console
        .iter()
        .position(|l| l.contains("milk-work: threads="))
        .unwrap();
    let start = out
        .console
        .iter()
        .position(|l| l.contains("milk-work: start"))
        .unwrap();
    assert!(end > start);
    let fin = final_report.expect("final swap");
    let guest = guest_tasks.expect("guest task list");
    let host: std::collections::BTreeSet<u32> = fin.pids.iter().copied().collect();
    let only_guest: Vec<_> = guest.difference(&host).collect();
    let only_host: Vec<_> = host.difference(&guest).collect();
    println!(
        "tasks: guest {} host {}; only in the guest's list {only_guest:?}, only in the \
         host's table {only_host:?}",
        guest.len(),
        host.len()
    );
    // No task lost over six hand-overs: every guest thread is in the host's table except
    // the counting processes (gone since), and the host knows no thread the guest does
    // not, except short-lived ones started after the count (the usleep).
    assert!(
        only_guest.len() <= 3,
        "tasks missing from the host table: {only_guest:?}"
    );
    assert!(
        only_host.len() <= 2,
        "host table has unknown tasks: {only_host:?}"
    );
    assert!(host.len() >= 20, "{host:?}");
    let st = final_status.expect("frontend status at the end");
    println!("frontend: {st:?}");
    assert_eq!((st.swaps, st.hangups), (6, 0), "{st:?}");
    let mut b: Vec<f64> = reports
        .iter()
        .chain(std::iter::once(&fin))
        .map(|r| r.blackout.as_secs_f64() * 1e3)
        .collect();
    b.sort_by(f64::total_cmp);
    println!(
        "BENCH cross-process swap blackout ms: min {:.3} median {:.3} max {:.3} (n={}) all {:.3?}",
        b[0],
        b[b.len() / 2],
        b[b.len() - 1],
        b.len(),
        b
    );
    for r in &reports {
        assert!(r.blackout < Duration::from_millis(250), "{r:?}");
        assert!(
            r.pids.len() > 64,
            "the workload's threads were handed over: {r:?}"
        );
    }
    // Every old daemon left once swapped away from; all exit at the end.
    for d in daemons.lock().unwrap().iter_mut() {
        assert!(
            d.wait_exit(Duration::from_secs(10)).is_some(),
            "a daemon stayed"
        );
    }
}

#[test]
fn three_kill_9_of_the_daemon_fall_back_and_reconnect() {
    let _one = ONE_GUEST.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("p.sock");
    let script = format!(
        "{WAIT_ENABLED}W;milk-mon -i 10 & m=$!;milk-work -t 64 -r 150 -w 40000 -s 20000;r=$?;\
         i=0;while [ $(cat /sys/kernel/milk/enables) -lt 4 ]&&[ $i -lt 200 ];\
         do usleep 50000;i=$((i+1));done;usleep 300000;kill $m;{PRINT_COUNTERS}\
         echo SCX2 $(cat /sys/kernel/sched_ext/state) $(cat /sys/kernel/sched_ext/root/ops);exit $r"
    );
    let spec = spec(&script);
    let mut daemon = Some(Daemon::start(&sock, CPUS as u16));
    let mut kills = 0;
    let mut killed_at: Option<Instant> = None;
    let mut fallbacks = Vec::new();
    let mut reconnects = Vec::new();
    let mut workload_running = false;
    let mut during_workload = 0;
    let mut final_status = None;
    let (out, _slot) = run(&spec, dir.path(), &sock, &mut |l, slot| {
        if l.contains("SCX2 ") {
            final_status = slot.status();
        }
        if l.contains("milk-work: start") {
            workload_running = true;
        }
        if l.contains("milk-work: threads=") {
            workload_running = false;
        }
        // Re-enabled after the previous kill (the enables counter moved too).
        let mon = from(l, "milk-mon: ");
        let enabled_line = mon.is_some_and(|m| {
            m.contains(" scx=enabled") && fields(m).get("enables") == Some(&(kills + 1).to_string())
        });
        let start_line = l.contains("milk-work: start");
        if kills < 3 && killed_at.is_none() && (start_line || (kills > 0 && enabled_line)) {
            if let Some(mut d) = daemon.take() {
                d.kill9();
            }
            killed_at = Some(Instant::now());
            kills += 1;
            if workload_running {
                during_workload += 1;
            }
        } else if mon.is_some_and(|m| m.contains(" scx=disabled")) {
            if let Some(t) = killed_at.take() {
                fallbacks.push(t.elapsed());
                // The guest is on CFS: a daemon comes back on the same socket.
                daemon = Some(Daemon::start(&sock, CPUS as u16));
                reconnects.push(Instant::now());
            }
        }
    });
    assert_workload_ok(&out);
    assert_one_boot(&out);
    assert_eq!(kills, 3);
    assert_eq!(during_workload, 3, "every kill hit the running workload");
    assert_eq!(fallbacks.len(), 3, "{fallbacks:?}");
    let ms: Vec<f64> = fallbacks.iter().map(|d| d.as_secs_f64() * 1e3).collect();
    println!("BENCH kill -9 -> guest on CFS (host clock, console) ms: {ms:?}");
    for f in &fallbacks {
        assert!(*f < Duration::from_secs(1), "fallback took {f:?}");
    }
    let c = counters(&out);
    assert_eq!(c.get("disables"), Some(&3), "{c:?}");
    assert_eq!(
        c.get("enables"),
        Some(&4),
        "re-enabled after every restart: {c:?}"
    );
    assert_eq!(
        c.get("host_goodbyes"),
        Some(&3),
        "milk-vmm told the guest: {c:?}"
    );
    assert_eq!(c.get("bad_records"), Some(&0), "{c:?}");
    assert!(
        out.console.iter().any(|l| l.contains("SCX2 enabled milk")),
        "milk not back"
    );
    let st = final_status.expect("frontend status at the end");
    println!("frontend: {st:?}");
    assert!(st.connected);
    assert_eq!((st.hangups, st.reconnects), (3, 3), "{st:?}");
}
