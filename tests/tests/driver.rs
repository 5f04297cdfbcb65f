//! The guest's virtio_milk driver and its ivshmem transport, under QEMU TCG
//! with the real guest kernel:
//!
//! - `device_of_another_protocol_version_is_refused_with_one_clear_error`: a
//!   device whose config space says another protocol version (v1 for the
//!   v2 driver) is refused at probe with one error line naming
//!   both versions; the bridge never attaches and the host hears nothing.
//! - `events_are_batched_and_counted`: under the host FIFO policy and
//!   `milk-work -t 64 -r 20`, the driver negotiates batching, its per-queue
//!   counters (sysfs `milk/` of the virtio device) agree with the host's
//!   engine counters, buffers carry more than one record on average, no
//!   record was refused, and EVENT_IDX saves kicks.
//! - `decision_interrupts_are_affine_to_their_cpu`: same run; CPU c's
//!   decision-queue MSI-X vector has affinity and effective affinity {c} in
//!   /proc/irq, and CPU c took (nearly) all of its interrupts.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use milk_harness::GuestSpec;
use milk_ivshmem::milk::MilkBackend;
use milk_ivshmem::session::{run_milk_guest, MilkGuestConfig, MilkRun};
use milk_ivshmem::{IvshmemTransport, TransportConfig};
use virtio_milk::device::MilkDevice;
use virtio_milk::protocol::PROTOCOL_VERSION;
use virtio_milk::runtime::RuntimeConfig;

const CPUS: u32 = 2;

/// One TCG guest at a time (two host cores).
static ONE_GUEST: Mutex<()> = Mutex::new(());

fn kconfig_has(config: &std::path::Path, opt: &str) -> bool {
    std::fs::read_to_string(config)
        .map(|t| t.lines().any(|l| l == format!("{opt}=y")))
        .unwrap_or(false)
}

fn guest_spec(script: &str) -> GuestSpec {
    let g = milk_tests::guest();
    for opt in [
        "CONFIG_VIRTIO_IVSHMEM",
        "CONFIG_VIRTIO_MILK",
        "CONFIG_SCHED_EXT_MILK",
        "CONFIG_ACPI",
    ] {
        assert!(
            kconfig_has(&g.kernel.config, opt),
            "the guest kernel lacks {opt}=y"
        );
    }
    assert!(
        !script.contains('"'),
        "/init ends milk.run at a double quote"
    );
    let mut spec = g.spec(&format!("milk.run=\"{script}\""));
    spec.cpus = CPUS;
    spec.timeout = Duration::from_secs(180);
    // x86 COMMAND_LINE_SIZE: a longer script would be cut silently.
    assert!(spec.full_cmdline().len() < 2048, "guest script too long");
    spec
}

/// Prints the driver's counters as `MILKD name=value`.
const PRINT_DRIVER: &str = "for f in /sys/bus/virtio/drivers/virtio_milk/virtio*/milk/*;do \
echo MILKD ${f##*/}=$(cat $f);done;";

/// Prints, per decision vector, its IRQ, per-CPU counts (/proc/interrupts,
/// two CPUs), name, affinity and effective affinity.
const PRINT_IRQS: &str = "grep decisions /proc/interrupts|while read i a b r;do i=${i%:};\
echo MILKI irq=$i on0=$a on1=$b name=${r##* } aff=$(cat /proc/irq/$i/smp_affinity_list) \
eff=$(cat /proc/irq/$i/effective_affinity_list);done;";

/// Waits (up to 10 s) until the bridge reports `enabled`.
const WAIT_ENABLED: &str = "i=0;while [ $(cat /sys/kernel/milk/state) != enabled ]\
&&[ $i -lt 200 ];do usleep 50000;i=$((i+1));done;";

fn fields(line: &str) -> HashMap<String, String> {
    line.split_whitespace()
        .filter_map(|w| w.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

fn num(f: &HashMap<String, String>, k: &str) -> u64 {
    f.get(k)
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no numeric {k} in {f:?}"))
}

#[test]
fn device_of_another_protocol_version_is_refused_with_one_clear_error() {
    let _ = env_logger::builder().is_test(true).try_init();
    let spec0 = guest_spec(
        "echo MILKS $(cat /sys/kernel/milk/state);ls /sys/bus/virtio/drivers/virtio_milk/;\
         ls -d /sys/bus/virtio/drivers/virtio_milk/virtio* >/dev/null 2>&1&&echo BOUND;exit 0",
    );
    let _one = ONE_GUEST.lock().unwrap_or_else(|e| e.into_inner());
    let dev = MilkDevice::new(
        CPUS,
        Box::new(|| milk_policies::by_name("fifo").expect("fifo policy")),
        RuntimeConfig::default(),
    )
    .expect("device");
    let backend = MilkBackend::new(dev);
    let control = backend.control();
    let mut info = backend.device_info();
    // struct virtio_milk_config: __le16 version at offset 4. The driver is
    // built from the same header as the host: the device now claims the
    // other version (v1 for today's v2).
    let ours = u16::from_le_bytes([info.config[4], info.config[5]]);
    assert_eq!(ours, u16::from(PROTOCOL_VERSION));
    let other: u16 = if ours == 1 { 2 } else { 1 };
    info.config[4..6].copy_from_slice(&other.to_le_bytes());
    let dir = tempfile::tempdir_in(milk_ivshmem::qemu_args::runtime_dir()).unwrap();
    let t = IvshmemTransport::new(
        TransportConfig::in_dir(dir.path(), spec0.memory_mib, info),
        backend,
    )
    .expect("transport");
    let mut spec = spec0.clone();
    t.qemu_args().apply(&mut spec);
    let handle = t.spawn().expect("transport thread");
    let out = milk_harness::run_qemu(&spec, &mut |l| println!("guest| {l}")).expect("guest ran");
    let _t = handle.stop().expect("transport stopped");
    let summaries = control.summaries();

    assert_eq!(out.result.map(|r| r.status), Some(0));
    let refusals: Vec<&String> = out
        .console
        .iter()
        .filter(|l| l.contains(&format!("protocol v{other}")))
        .collect();
    assert_eq!(refusals.len(), 1, "one refusal line: {refusals:?}");
    assert!(
        refusals[0].contains(&format!(
            "device speaks virtio-milk protocol v{other}, this driver v{ours}: refusing it"
        )),
        "{}",
        refusals[0]
    );
    assert!(
        !out.console.iter().any(|l| l == "BOUND"),
        "the driver bound the v1 device"
    );
    let state = out
        .console
        .iter()
        .find_map(|l| l.strip_prefix("MILKS "))
        .expect("bridge state printed");
    assert_ne!(state.trim(), "enabled");
    // The guest never said HELLO: no runtime ran, or one that heard nothing.
    for s in &summaries {
        assert_eq!(s.metrics.messages(), 0, "host heard the guest:\n{s}");
    }
}

/// The FIFO run both batching and affinity tests read.
fn fifo_run() -> &'static MilkRun {
    static RUN: OnceLock<MilkRun> = OnceLock::new();
    RUN.get_or_init(|| {
        let _ = env_logger::builder().is_test(true).try_init();
        let spec = guest_spec(&format!(
            "{WAIT_ENABLED}milk-work -t 64 -r 20 -w 20000 -s 2000;r=$?;{PRINT_DRIVER}{PRINT_IRQS}exit $r"
        ));
        let _one = ONE_GUEST.lock().unwrap_or_else(|e| e.into_inner());
        let run = run_milk_guest(&MilkGuestConfig::new(spec, "fifo"), &mut |l, _| {
            println!("guest| {l}")
        })
        .expect("guest ran to its end");
        for s in &run.summaries {
            println!("{s}");
        }
        run
    })
}

fn driver_counters(run: &MilkRun) -> HashMap<String, u64> {
    run.outcome
        .console
        .iter()
        .filter_map(|l| l.strip_prefix("MILKD "))
        .filter_map(|w| w.split_once('='))
        .map(|(k, v)| {
            let n = v
                .trim()
                .parse()
                .unwrap_or_else(|_| panic!("driver counter {k}={v}"));
            (k.to_owned(), n)
        })
        .collect()
}

#[test]
fn events_are_batched_and_counted() {
    let run = fifo_run();
    assert_eq!(run.status(), Some(0), "workload failed");
    let d = driver_counters(run);
    let get = |k: &str| {
        *d.get(k)
            .unwrap_or_else(|| panic!("no driver counter {k}: {d:?}"))
    };
    assert!(get("batch") > 1, "VIRTIO_MILK_F_BATCH not in use: {d:?}");
    let (records, buffers, kicks) = (
        get("event_records"),
        get("event_buffers"),
        get("event_kicks"),
    );
    assert!(buffers > 0 && records >= buffers, "{d:?}");
    assert!(records <= buffers * get("batch"), "{d:?}");
    assert_eq!(get("event_full"), 0, "records refused: {d:?}");
    assert!(kicks <= buffers, "{d:?}");
    assert!(
        get("decision_records") > 0 && get("decision_irqs") > 0,
        "{d:?}"
    );

    // The host's engine saw the same buffers (its counts are final, the
    // guest's were read before the guest ended).
    let s = run.summaries.last().expect("a runtime ran");
    let e = &s.engine;
    assert_eq!(e.malformed_total(), 0, "{s}");
    let chains: u64 = run.summaries.iter().map(|s| s.engine.event_chains).sum();
    let recs: u64 = run.summaries.iter().map(|s| s.engine.records_in).sum();
    assert!(
        chains >= buffers,
        "host saw {chains} event buffers, guest posted {buffers}"
    );
    assert!(
        recs >= records,
        "host got {recs} records, guest queued {records}"
    );
    let per_buffer = recs as f64 / chains as f64;
    println!(
        "records per event buffer: guest {:.2}, host {per_buffer:.2}; kicks per buffer {:.3}; \
         decision interrupts per decision record {:.3}",
        records as f64 / buffers as f64,
        kicks as f64 / buffers as f64,
        get("decision_irqs") as f64 / get("decision_records") as f64
    );
    assert!(
        per_buffer > 1.0,
        "buffers carry {per_buffer:.2} records on average: no batching"
    );
}

#[test]
fn decision_interrupts_are_affine_to_their_cpu() {
    let run = fifo_run();
    let lines: Vec<HashMap<String, String>> = run
        .outcome
        .console
        .iter()
        .filter_map(|l| l.strip_prefix("MILKI "))
        .map(fields)
        .collect();
    assert_eq!(lines.len(), CPUS as usize, "IRQ lines: {lines:?}");
    for f in &lines {
        let cpu: u64 = f
            .get("name")
            .and_then(|n| n.strip_prefix("decisions."))
            .and_then(|c| c.parse().ok())
            .unwrap_or_else(|| panic!("not a decision vector: {f:?}"));
        assert_eq!(num(f, "aff"), cpu, "affinity of decisions.{cpu}: {f:?}");
        assert_eq!(
            num(f, "eff"),
            cpu,
            "effective affinity of decisions.{cpu}: {f:?}"
        );
        let (on0, on1) = (num(f, "on0"), num(f, "on1"));
        let (mine, other) = if cpu == 0 { (on0, on1) } else { (on1, on0) };
        println!("decisions.{cpu}: {mine} interrupts on CPU {cpu}, {other} elsewhere");
        assert!(mine > 0, "no decision interrupt on CPU {cpu}: {f:?}");
        // At most the first interrupt after the affinity change lands on the
        // old CPU (x86 moves an MSI at its next interrupt).
        assert!(other <= 1 + mine / 100, "decisions.{cpu}: {f:?}");
    }
}
