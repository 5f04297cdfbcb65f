//! Start-up benchmark: milk-vmm (KVM) next to `qemu-system-x86_64 -M microvm`
//! (KVM) booting the same kernel with a 256 MiB guest.
//!
//! - time from process start (spawn) to the first guest instruction: the
//!   freestanding test guest's first instructions write '@' to COM1, so this is
//!   the time until that byte arrives on the VMM's stdout;
//! - peak RSS (VmHWM) of the VMM process;
//! - with `--vmlinux PATH`: the same for the real kernel, plus the time to its
//!   banner ("Linux version") on the console.
//!
//! Run: `cargo run --release -p milk-vmm --example startup -- [--runs N] [--vmlinux PATH]`

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

struct Sample {
    first_byte: Option<Duration>,
    banner: Option<Duration>,
    peak_rss_kib: u64,
}

/// What the output reader has seen so far.
#[derive(Clone, Copy, Default)]
struct Seen {
    first_byte: Option<Duration>,
    banner: Option<Duration>,
    result: bool,
}

fn vm_hwm(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Runs `cmd`, timing the first stdout byte and the kernel banner, sampling
/// VmHWM until the process exits, `limit` passes, or (with `stop_at_banner`)
/// 2 s after the banner, or once `MILK-RESULT` was printed; then it is killed.
/// (QEMU on kvm_pvm does not exit on the test guest's final triple fault: the
/// emulation failure pauses it.)
fn measure(mut cmd: Command, limit: Duration, stop_at_banner: bool) -> Sample {
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn VMM");
    let pid = child.id();
    let mut stdout = child.stdout.take().unwrap();
    let seen: Arc<Mutex<Seen>> = Arc::default();
    let seen2 = seen.clone();
    let reader = std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        let mut text = Vec::new();
        loop {
            match stdout.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let now = start.elapsed();
                    let mut s = seen2.lock().unwrap();
                    if s.first_byte.is_none() {
                        s.first_byte = Some(now);
                    }
                    text.extend_from_slice(&buf[..n]);
                    let t = String::from_utf8_lossy(&text);
                    if s.banner.is_none() && t.contains("Linux version") {
                        s.banner = Some(now);
                    }
                    if t.contains("MILK-RESULT") {
                        s.result = true;
                    }
                }
            }
        }
    });
    let mut peak = 0;
    loop {
        if let Some(k) = vm_hwm(pid) {
            peak = peak.max(k);
        }
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        let Seen { banner, result, .. } = *seen.lock().unwrap();
        let give_up = start.elapsed() > limit
            || result
            || (stop_at_banner
                && banner.is_some_and(|b| start.elapsed() > b + Duration::from_secs(2)));
        if give_up {
            let _ = child.kill();
            let _ = child.wait();
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let _ = reader.join();
    if std::env::var_os("STARTUP_DEBUG").is_some() {
        eprintln!("run took {:?}", start.elapsed());
    }
    let s = seen.lock().unwrap();
    Sample {
        first_byte: s.first_byte,
        banner: s.banner,
        peak_rss_kib: peak,
    }
}

fn milk_vmm_bin() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent().unwrap().parent().unwrap().join("milk-vmm")
}

fn milk_cmd(kernel: &Path, echo: bool) -> Command {
    let mut c = Command::new(milk_vmm_bin());
    c.args([
        "--kernel",
        kernel.to_str().unwrap(),
        "--engine",
        "kvm",
        "--memory",
        "256",
    ]);
    if echo {
        c.arg("--echo-device");
    }
    c.env("RUST_LOG", "warn");
    c
}

fn qemu_cmd(kernel: &Path) -> Command {
    let mut c = Command::new("qemu-system-x86_64");
    c.args([
        "-M",
        "microvm,x-option-roms=off,rtc=off",
        "-accel",
        "kvm",
        // kvm_pvm rejects MSR_IA32_ARCH_CAPABILITIES, which "-cpu host" sets.
        "-cpu",
        "host,-arch-capabilities",
        "-m",
        "256",
        "-smp",
        "1",
        "-nodefaults",
        "-no-user-config",
        "-no-reboot",
        "-display",
        "none",
        "-serial",
        "stdio",
        "-monitor",
        "none",
        "-kernel",
        kernel.to_str().unwrap(),
        "-append",
        "console=ttyS0 earlyprintk=ttyS0 reboot=t panic=-1 loglevel=7",
    ]);
    c
}

fn ms(d: Option<Duration>) -> String {
    d.map_or("-".into(), |d| format!("{:.1}", d.as_secs_f64() * 1000.0))
}

fn median(mut v: Vec<Duration>) -> Option<Duration> {
    v.sort();
    v.get(v.len() / 2).copied()
}

fn report(name: &str, samples: &[Sample]) {
    let first: Vec<_> = samples.iter().filter_map(|s| s.first_byte).collect();
    let banner: Vec<_> = samples.iter().filter_map(|s| s.banner).collect();
    let mut rss: Vec<_> = samples.iter().map(|s| s.peak_rss_kib).collect();
    rss.sort();
    println!(
        "| {name} | {} | {} | {} | {} | {:.1} |",
        samples.len(),
        ms(median(first.clone())),
        ms(first.iter().min().copied()),
        ms(median(banner)),
        rss[rss.len() / 2] as f64 / 1024.0,
    );
}

fn main() {
    let mut runs = 10;
    let mut vmlinux: Option<PathBuf> = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--runs" => runs = args.next().and_then(|v| v.parse().ok()).unwrap_or(runs),
            "--vmlinux" => vmlinux = args.next().map(PathBuf::from),
            _ => {
                eprintln!("usage: startup [--runs N] [--vmlinux PATH]");
                std::process::exit(2);
            }
        }
    }
    let out = std::env::temp_dir().join("milk-startup-bench");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("test-guest/build.sh");
    let ok = Command::new("sh")
        .arg(script)
        .arg(&out)
        .status()
        .unwrap()
        .success();
    assert!(ok, "building the test guest failed");
    let guest = out.join("milk-test-guest-pvh.elf");

    println!("| VMM (256 MiB guest, KVM) | runs | first guest instruction, median ms | min ms | kernel banner, median ms | peak RSS, median MiB |");
    println!("|---|---|---|---|---|---|");
    let limit = Duration::from_secs(20);
    let s: Vec<_> = (0..runs)
        .map(|_| measure(milk_cmd(&guest, true), limit, false))
        .collect();
    report("milk-vmm, test guest", &s);
    let s: Vec<_> = (0..runs)
        .map(|_| measure(qemu_cmd(&guest), limit, false))
        .collect();
    report("qemu microvm, test guest", &s);
    if let Some(k) = vmlinux {
        let n = runs.min(3);
        let limit = Duration::from_secs(120);
        let s: Vec<_> = (0..n)
            .map(|_| measure(milk_cmd(&k, false), limit, true))
            .collect();
        report("milk-vmm, vmlinux", &s);
        let s: Vec<_> = (0..n).map(|_| measure(qemu_cmd(&k), limit, true)).collect();
        report("qemu microvm, vmlinux", &s);
    }
}
