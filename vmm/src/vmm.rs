//! Building and running a KVM virtual machine.
//!
//! [`Vm::run`] does everything in order: validate the configuration, create the
//! VM (in-kernel irqchip + PIT), guest memory, load kernel/initramfs, build the
//! command line, set up devices (COM1, i8042, virtio-mmio slots), the vCPUs
//! (one thread each) and then runs the device event loop on the calling
//! thread until some thread asks the VM to stop. Every exit path stops and
//! joins all vCPU threads before returning.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Cap, IoEventAddress, Kvm, VmFd};
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::signal::Killable;

use crate::boot::{self, EntryMode};
use crate::cmdline::{build_cmdline, cmdline_string, MmioDeviceInfo};
use crate::cpu;
use crate::devices::i8042::I8042;
use crate::devices::serial::{Console, LineCallback, SerialDevice, TAIL_LINES};
use crate::devices::virtio::mmio::{reg, MmioTransport, QueueNotifyHandler};
use crate::devices::virtio::{NotificationMode, VirtioDevice};
use crate::devices::Bus;
use crate::error::VmmError;
use crate::exit::{ExitHandle, ExitReason};
use crate::layout;
use crate::memory::{create_guest_memory, GuestMemory};
use crate::vcpu::{self, Vcpu, VcpuTiming};

/// Set by the binary as early as possible; timings are measured from here when set.
pub static PROCESS_START: OnceLock<Instant> = OnceLock::new();

/// What to run.
#[derive(Clone, Debug)]
pub struct VmConfig {
    /// vmlinux (ELF, PVH or 64-bit entry) or bzImage.
    pub kernel: PathBuf,
    /// Initramfs.
    pub initrd: Option<PathBuf>,
    /// User part of the kernel command line.
    pub cmdline: String,
    /// Number of vCPUs.
    pub cpus: u32,
    /// Guest RAM in MiB.
    pub memory_mib: u32,
    /// Copy of the serial output.
    pub serial_log: Option<PathBuf>,
    /// Copy serial output to stdout.
    pub echo_console: bool,
    /// Forward stdin to the guest's serial port.
    pub forward_stdin: bool,
    /// Stop the guest after this long.
    pub timeout: Option<Duration>,
    /// Turn SIGINT/SIGTERM into a clean VM stop (binary only).
    pub handle_signals: bool,
    /// Enter an ELF kernel through the 64-bit boot protocol (zero page) even
    /// when it has a PVH note.
    pub force_linux64: bool,
}

impl VmConfig {
    /// A config with defaults: 1 vCPU, 256 MiB, console echo on.
    pub fn new(kernel: impl Into<PathBuf>) -> Self {
        VmConfig {
            kernel: kernel.into(),
            initrd: None,
            cmdline: String::new(),
            cpus: 1,
            memory_mib: 256,
            serial_log: None,
            echo_console: true,
            forward_stdin: false,
            timeout: None,
            handle_signals: false,
            force_linux64: false,
        }
    }

    /// Checks everything that can be checked before touching KVM.
    pub fn validate(&self) -> Result<(), VmmError> {
        if self.cpus == 0 || self.cpus > layout::MAX_VCPUS {
            return Err(VmmError::InvalidConfig(format!(
                "--cpus must be 1..={}, got {}",
                layout::MAX_VCPUS,
                self.cpus
            )));
        }
        if self.memory_mib < layout::MIN_MEMORY_MIB || self.memory_mib > layout::MAX_MEMORY_MIB {
            return Err(VmmError::InvalidConfig(format!(
                "--memory must be {}..={} MiB, got {}",
                layout::MIN_MEMORY_MIB,
                layout::MAX_MEMORY_MIB,
                self.memory_mib
            )));
        }
        if let Some(host) = host_memory_mib() {
            if u64::from(self.memory_mib) > host {
                return Err(VmmError::InvalidConfig(format!(
                    "--memory {} MiB exceeds the host's {host} MiB of RAM",
                    self.memory_mib
                )));
            }
        }
        check_input(&self.kernel)?;
        check_kernel_format(&self.kernel)?;
        if let Some(i) = &self.initrd {
            check_input(i)?;
            let size = std::fs::metadata(i).map(|m| m.len()).unwrap_or(0);
            let mem = u64::from(self.memory_mib) << 20;
            if size == 0 || size >= mem {
                return Err(VmmError::Boot(boot::BootError::InitrdTooLarge {
                    size,
                    free: mem,
                }));
            }
        }
        Ok(())
    }
}

/// Rejects files that are neither ELF nor bzImage before any engine starts.
fn check_kernel_format(p: &std::path::Path) -> Result<(), VmmError> {
    use std::io::Read;
    let mut head = Vec::with_capacity(0x400);
    File::open(p)
        .and_then(|f| f.take(0x400).read_to_end(&mut head))
        .map_err(|e| VmmError::Input {
            path: p.to_path_buf(),
            msg: e.to_string(),
        })?;
    if boot::detect_format(&head).is_none() {
        return Err(VmmError::Boot(boot::BootError::KernelFormat {
            path: p.display().to_string(),
            err: linux_loader::loader::Error::Elf(
                linux_loader::loader::elf::Error::InvalidElfMagicNumber,
            ),
        }));
    }
    Ok(())
}

fn check_input(p: &std::path::Path) -> Result<(), VmmError> {
    let err = |msg: String| VmmError::Input {
        path: p.to_path_buf(),
        msg,
    };
    let f = File::open(p).map_err(|e| err(e.to_string()))?;
    let m = f.metadata().map_err(|e| err(e.to_string()))?;
    if !m.is_file() {
        return Err(err("not a regular file".into()));
    }
    Ok(())
}

/// Physical RAM of the host in MiB.
pub fn host_memory_mib() -> Option<u64> {
    // SAFETY: sysconf has no memory-safety preconditions.
    let pages = unsafe { libc::sysconf(libc::_SC_PHYS_PAGES) };
    // SAFETY: as above.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    (pages > 0 && page > 0).then(|| (pages as u64 * page as u64) >> 20)
}

/// Boot timing of one run.
#[derive(Clone, Debug, Default)]
pub struct BootTimings {
    /// From [`PROCESS_START`] (or the start of [`Vm::run`]) to the boot vCPU's
    /// first `KVM_RUN`: the first guest instruction runs right after.
    pub to_first_entry: Option<Duration>,
    /// To the boot vCPU's first port/MMIO write exit.
    pub to_first_io: Option<Duration>,
    /// To the first byte on the serial console.
    pub to_first_serial_byte: Option<Duration>,
    /// Whole run.
    pub total: Duration,
}

/// How a run ended.
#[derive(Clone, Debug)]
pub struct VmOutcome {
    /// Why the VM stopped.
    pub exit: ExitReason,
    /// The guest's `MILK-RESULT status=<n>`.
    pub result: Option<i32>,
    /// Last console lines.
    pub console_tail: Vec<String>,
    /// All console lines kept.
    pub console: Vec<String>,
    /// The kernel command line the guest got.
    pub cmdline: String,
    /// Kernel entry protocol used.
    pub entry_mode: EntryMode,
    /// Timings.
    pub timings: BootTimings,
    /// Peak resident set size of this process (VmHWM), KiB.
    pub peak_rss_kib: Option<u64>,
}

/// A VM to run: configuration plus extra virtio devices.
pub struct Vm {
    config: VmConfig,
    devices: Vec<Box<dyn VirtioDevice>>,
    line_cb: Option<LineCallback>,
    exit: Option<ExitHandle>,
}

/// Handle on a virtio-mmio slot of a running or finished VM.
pub type TransportHandle = Arc<Mutex<MmioTransport>>;

impl Vm {
    /// New VM for `config`.
    pub fn new(config: VmConfig) -> Self {
        Vm {
            config,
            devices: Vec::new(),
            line_cb: None,
            exit: None,
        }
    }

    /// The handle that stops this VM from another thread (e.g.
    /// `exit_handle()?.request(ExitReason::Stopped)`), valid before and during the run.
    pub fn exit_handle(&mut self) -> std::io::Result<ExitHandle> {
        if self.exit.is_none() {
            self.exit = Some(ExitHandle::new()?);
        }
        Ok(self.exit.clone().expect("just set"))
    }

    /// Adds a virtio device in the next virtio-mmio slot; returns the slot index
    /// (slot `i` is at [`layout::virtio_mmio_addr`]`(i)`, IRQ
    /// [`layout::virtio_mmio_irq`]`(i)`).
    pub fn add_virtio_device(&mut self, dev: Box<dyn VirtioDevice>) -> Result<usize, VmmError> {
        if self.devices.len() >= layout::VIRTIO_MMIO_MAX_DEVICES {
            return Err(VmmError::InvalidConfig(format!(
                "at most {} virtio devices",
                layout::VIRTIO_MMIO_MAX_DEVICES
            )));
        }
        self.devices.push(dev);
        Ok(self.devices.len() - 1)
    }

    /// Calls `cb` for every complete console line.
    pub fn on_console_line(&mut self, cb: LineCallback) {
        self.line_cb = Some(cb);
    }

    /// Runs the VM to its end.
    pub fn run(self) -> Result<VmOutcome, VmmError> {
        self.run_with_transports(&mut Vec::new())
    }

    /// Runs the VM; `transports` receives the virtio-mmio slots (for inspection
    /// after the run).
    pub fn run_with_transports(
        self,
        transports: &mut Vec<TransportHandle>,
    ) -> Result<VmOutcome, VmmError> {
        let t0 = *PROCESS_START.get().unwrap_or(&Instant::now());
        let Vm {
            config,
            devices,
            line_cb,
            exit,
        } = self;
        config.validate()?;
        vcpu::register_kick_handler().map_err(|e| VmmError::Io {
            what: "installing the vCPU kick signal handler".into(),
            err: std::io::Error::from_raw_os_error(e.errno()),
        })?;

        let kvm = Kvm::new().map_err(|e| VmmError::KvmUnavailable(format!("/dev/kvm: {e}")))?;
        let missing = missing_capabilities(|c| kvm.check_extension(c));
        if !missing.is_empty() {
            return Err(VmmError::MissingCapabilities(missing.join(", ")));
        }
        // Advertised when KVM emulates it; `MILK_TSC_DEADLINE=0` turns it off
        // (the nested L1 does: see docs/vmm.md "Nested KVM CI").
        let tsc_deadline = kvm.check_extension(Cap::TscDeadlineTimer)
            && std::env::var("MILK_TSC_DEADLINE").as_deref() != Ok("0");
        let max = kvm.get_max_vcpus() as u32;
        if config.cpus > max {
            return Err(VmmError::InvalidConfig(format!(
                "--cpus {} exceeds KVM's limit of {max}",
                config.cpus
            )));
        }
        let step = |what: &str| log::debug!("setup: {what} at {:?}", t0.elapsed());
        step("KVM opened");
        let vm_fd = kvm.create_vm().map_err(VmmError::kvm("KVM_CREATE_VM"))?;
        vm_fd
            .set_tss_address(layout::KVM_TSS_START as usize)
            .map_err(VmmError::kvm("KVM_SET_TSS_ADDR"))?;
        vm_fd
            .set_identity_map_address(layout::KVM_IDENTITY_MAP_START)
            .map_err(VmmError::kvm("KVM_SET_IDENTITY_MAP_ADDR"))?;
        vm_fd
            .create_irq_chip()
            .map_err(VmmError::kvm("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config {
            flags: kvm_bindings::KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm_fd
            .create_pit2(pit)
            .map_err(VmmError::kvm("KVM_CREATE_PIT2"))?;

        step("VM created");
        let mem_size = u64::from(config.memory_mib) << 20;
        let mem = create_guest_memory(mem_size)?;
        register_memory(&vm_fd, &mem)?;
        step("memory registered");
        cpu::write_gdt(&mem)?;
        cpu::write_page_tables(&mem)?;
        step("page tables written");
        let kernel = boot::load_kernel(&mem, &config.kernel, config.force_linux64)?;
        step("kernel loaded");
        log::info!(
            "kernel {}: {:?}, {:?} entry at {:#x}",
            config.kernel.display(),
            kernel.format,
            kernel.mode,
            kernel.entry.raw_value()
        );

        let exit = match exit {
            Some(e) => e,
            None => ExitHandle::new().map_err(VmmError::io("creating the exit eventfd"))?,
        };
        let log_file = match &config.serial_log {
            Some(p) => Some(File::create(p).map_err(|err| VmmError::SerialLog {
                path: p.clone(),
                err,
            })?),
            None => None,
        };
        let console = Console::new(config.echo_console, log_file);
        if let Some(cb) = line_cb {
            console.set_line_callback(cb);
        }

        let mut pio = Bus::new();
        let mut mmio = Bus::new();
        let serial_irq = EventFd::new(EFD_NONBLOCK).map_err(VmmError::io("eventfd"))?;
        vm_fd
            .register_irqfd(&serial_irq, layout::COM1_IRQ)
            .map_err(VmmError::kvm("KVM_IRQFD (COM1)"))?;
        let serial = Arc::new(Mutex::new(SerialDevice::new(serial_irq, console.clone())));
        insert(
            &mut pio,
            serial.clone(),
            layout::COM1_PORT.into(),
            layout::COM_PORT_SIZE.into(),
        )?;
        let i8042 = Arc::new(Mutex::new(I8042::new(exit.clone())));
        insert(
            &mut pio,
            i8042,
            layout::I8042_DATA_PORT.into(),
            layout::I8042_PORT_SIZE.into(),
        )?;

        let mut infos = Vec::new();
        for (i, dev) in devices.into_iter().enumerate() {
            let (t, info) = attach_virtio(&vm_fd, &mem, &mut mmio, i, dev)?;
            transports.push(t);
            infos.push(info);
        }

        let cmdline = build_cmdline(&config.cmdline, &infos)?;
        let cmdline_str = cmdline_string(&cmdline)?;
        log::info!("kernel command line: {cmdline_str}");
        let initrd = match &config.initrd {
            Some(p) => {
                let i = boot::load_initrd(&mem, mem_size, &kernel, p)?;
                log::info!("initramfs: {} bytes at {:#x}", i.size, i.addr);
                Some(i)
            }
            None => None,
        };
        boot::write_cmdline(&mem, &cmdline)?;
        boot::write_boot_info(
            &mem,
            mem_size,
            config.cpus,
            &kernel,
            cmdline_str.len() + 1,
            initrd,
        )?;

        step("devices and boot data ready");
        let mut em = EventManager::<Arc<Mutex<dyn MutEventSubscriber>>>::new().map_err(|e| {
            VmmError::Io {
                what: format!("creating the event loop: {e:?}"),
                err: std::io::Error::other("event-manager"),
            }
        })?;
        let exit_evt = exit
            .eventfd()
            .try_clone()
            .map_err(VmmError::io("eventfd"))?;
        em.add_subscriber(Arc::new(Mutex::new(ExitWatcher(exit_evt))));
        for t in transports.iter() {
            let mode = t
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .notification_mode();
            if mode == NotificationMode::EventLoop {
                let h = QueueNotifyHandler::new(t.clone()).map_err(VmmError::io("eventfd"))?;
                em.add_subscriber(Arc::new(Mutex::new(h)));
            }
        }
        if config.forward_stdin {
            em.add_subscriber(Arc::new(Mutex::new(StdinForwarder {
                serial: serial.clone(),
            })));
        }

        let timing = Arc::new(Mutex::new(VcpuTiming::default()));
        let mut threads = VcpuThreads::new();
        let base_cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(VmmError::kvm("KVM_GET_SUPPORTED_CPUID"))?;
        let mut vcpus = Vec::new();
        for id in 0..config.cpus {
            let fd = vm_fd
                .create_vcpu(u64::from(id))
                .map_err(VmmError::kvm(format!("KVM_CREATE_VCPU {id}")))?;
            let boot = (id == 0).then_some((kernel.mode, kernel.entry.raw_value()));
            cpu::configure_vcpu(&fd, id, config.cpus, &base_cpuid, tsc_deadline, boot)?;
            vcpus.push(Vcpu {
                id,
                fd,
                pio: pio.clone(),
                mmio: mmio.clone(),
                exit: exit.clone(),
                stop: threads.stop.clone(),
                timing: (id == 0).then(|| timing.clone()),
            });
        }
        step("vCPUs configured");
        let _signals = config
            .handle_signals
            .then(|| TerminationSignals::install(exit.eventfd()));
        for v in vcpus {
            let id = v.id;
            let h = std::thread::Builder::new()
                .name(format!("vcpu{id}"))
                .spawn(move || v.run())
                .map_err(VmmError::io(format!("spawning vCPU thread {id}")))?;
            threads.handles.push(h);
        }

        let deadline = config.timeout.map(|t| Instant::now() + t);
        let loop_result = run_event_loop(&mut em, &exit, deadline);
        threads.stop_all();
        console.flush();
        loop_result?;

        let reason = exit
            .reason()
            .unwrap_or_else(|| ExitReason::VmmError("event loop ended without a reason".into()));
        let t = timing.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let since = |i: Option<Instant>| i.map(|i| i.saturating_duration_since(t0));
        let outcome = VmOutcome {
            exit: reason,
            result: console.result(),
            console_tail: console.tail(TAIL_LINES),
            console: console.lines(),
            cmdline: cmdline_str,
            entry_mode: kernel.mode,
            timings: BootTimings {
                to_first_entry: since(t.first_entry),
                to_first_io: since(t.first_io_exit),
                to_first_serial_byte: since(console.first_byte_at()),
                total: t0.elapsed(),
            },
            peak_rss_kib: peak_rss_kib(),
        };
        log::info!(
            "VM stopped: {}; first KVM_RUN after {:?}, first guest I/O after {:?}, peak RSS {:?} KiB",
            outcome.exit,
            outcome.timings.to_first_entry,
            outcome.timings.to_first_io,
            outcome.peak_rss_kib
        );
        Ok(outcome)
    }
}

/// The process exit code for a finished run: the guest's result status if it
/// printed one, else a code from [`crate::exit_code`] (with a line on stderr).
pub fn outcome_exit_code(o: &VmOutcome) -> i32 {
    use crate::error::exit_code;
    if let Some(s) = o.result {
        return s;
    }
    let code = match &o.exit {
        r if r.is_clean() => {
            eprintln!("milk-vmm: {r} without a MILK-RESULT line");
            return exit_code::NO_RESULT;
        }
        ExitReason::Timeout => exit_code::TIMEOUT,
        ExitReason::Signal(s) => exit_code::SIGNAL_BASE + s,
        ExitReason::Stopped => {
            eprintln!("milk-vmm: {}", o.exit);
            return 0;
        }
        ExitReason::GuestFault(_) => exit_code::GUEST_FAULT,
        _ => exit_code::SOFTWARE,
    };
    eprintln!("milk-vmm: {}", o.exit);
    code
}

fn insert(
    bus: &mut Bus,
    dev: Arc<Mutex<dyn crate::devices::BusDevice>>,
    base: u64,
    len: u64,
) -> Result<(), VmmError> {
    bus.insert(dev, base, len)
        .map_err(|e| VmmError::InvalidConfig(e.to_string()))
}

fn register_memory(vm_fd: &VmFd, mem: &GuestMemory) -> Result<(), VmmError> {
    for (slot, region) in mem.iter().enumerate() {
        let host = region
            .get_host_address(MemoryRegionAddress(0))
            .map_err(|e| VmmError::Io {
                what: "guest memory host address".into(),
                err: std::io::Error::other(e.to_string()),
            })?;
        let r = kvm_userspace_memory_region {
            slot: slot as u32,
            guest_phys_addr: region.start_addr().raw_value(),
            memory_size: region.len(),
            userspace_addr: host as u64,
            flags: 0,
        };
        // SAFETY: the region is a live mapping of `region.len()` bytes owned by
        // `mem`, which outlives the VM (vCPU threads are joined before `mem`
        // is dropped at the end of `run`).
        unsafe { vm_fd.set_user_memory_region(r) }.map_err(VmmError::kvm(format!(
            "KVM_SET_USER_MEMORY_REGION slot {slot}"
        )))?;
    }
    Ok(())
}

fn attach_virtio(
    vm_fd: &VmFd,
    mem: &GuestMemory,
    mmio: &mut Bus,
    slot: usize,
    dev: Box<dyn VirtioDevice>,
) -> Result<(TransportHandle, MmioDeviceInfo), VmmError> {
    let addr = layout::virtio_mmio_addr(slot);
    let irq = layout::virtio_mmio_irq(slot);
    let irq_evt = EventFd::new(EFD_NONBLOCK).map_err(VmmError::io("eventfd"))?;
    vm_fd
        .register_irqfd(&irq_evt, irq)
        .map_err(VmmError::kvm(format!("KVM_IRQFD (virtio slot {slot})")))?;
    let kind = dev.device_type();
    let t = MmioTransport::new(dev, mem.clone(), irq_evt).map_err(VmmError::io("eventfd"))?;
    for (q, evt) in t.queue_evts().iter().enumerate() {
        vm_fd
            .register_ioevent(
                evt,
                &IoEventAddress::Mmio(addr + reg::QUEUE_NOTIFY),
                q as u32,
            )
            .map_err(VmmError::kvm(format!(
                "KVM_IOEVENTFD (virtio slot {slot} queue {q})"
            )))?;
    }
    let t = Arc::new(Mutex::new(t));
    insert(mmio, t.clone(), addr, layout::VIRTIO_MMIO_SIZE)?;
    log::info!("virtio-mmio slot {slot}: device type {kind} at {addr:#x}, IRQ {irq}");
    Ok((
        t,
        MmioDeviceInfo {
            addr,
            size: layout::VIRTIO_MMIO_SIZE,
            irq,
        },
    ))
}

fn run_event_loop(
    em: &mut EventManager<Arc<Mutex<dyn MutEventSubscriber>>>,
    exit: &ExitHandle,
    deadline: Option<Instant>,
) -> Result<(), VmmError> {
    loop {
        if let Some(sig) = TerminationSignals::take() {
            exit.request(ExitReason::Signal(sig));
        }
        if exit.reason().is_some() {
            return Ok(());
        }
        let timeout_ms = match deadline {
            Some(d) => {
                let now = Instant::now();
                if now >= d {
                    exit.request(ExitReason::Timeout);
                    continue;
                }
                (d - now).as_millis().clamp(1, 1000) as i32
            }
            None => 1000,
        };
        if let Err(e) = em.run_with_timeout(timeout_ms) {
            exit.request(ExitReason::VmmError(format!("event loop: {e:?}")));
        }
    }
}

/// Owns the vCPU threads; stops and joins them on every path (also on drop).
struct VcpuThreads {
    stop: Arc<AtomicBool>,
    handles: Vec<JoinHandle<()>>,
}

impl VcpuThreads {
    fn new() -> Self {
        VcpuThreads {
            stop: Arc::new(AtomicBool::new(false)),
            handles: Vec::new(),
        }
    }

    fn stop_all(&mut self) {
        self.stop.store(true, Ordering::Release);
        let sig = vcpu::kick_signal();
        for h in self.handles.drain(..) {
            // Kick until the thread leaves KVM_RUN and notices the flag.
            let mut tries = 0u32;
            while !h.is_finished() {
                if let Err(e) = h.kill(sig) {
                    log::debug!("kicking vCPU thread: {e}");
                }
                std::thread::sleep(Duration::from_millis(1));
                tries += 1;
                if tries.is_multiple_of(5000) {
                    log::warn!("vCPU thread still running after {} s", tries / 1000);
                }
            }
            if h.join().is_err() {
                log::error!("a vCPU thread panicked");
            }
        }
    }
}

impl Drop for VcpuThreads {
    fn drop(&mut self) {
        self.stop_all();
    }
}

struct ExitWatcher(EventFd);

impl MutEventSubscriber for ExitWatcher {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.0.read();
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.0, EventSet::IN)) {
            log::error!("cannot watch the exit eventfd: {e:?}");
        }
    }
}

struct StdinForwarder {
    serial: Arc<Mutex<SerialDevice>>,
}

impl MutEventSubscriber for StdinForwarder {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let mut buf = [0u8; 64];
        // SAFETY: reading into a valid stack buffer of the given length.
        let n = unsafe { libc::read(libc::STDIN_FILENO, buf.as_mut_ptr().cast(), buf.len()) };
        if n <= 0 {
            let _ = ops.remove(events);
            return;
        }
        self.serial
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .enqueue_input(&buf[..n as usize]);
    }

    fn init(&mut self, ops: &mut EventOps) {
        let stdin = std::io::stdin();
        if let Err(e) = ops.add(Events::new(&stdin.as_raw_fd(), EventSet::IN)) {
            // Regular files and /dev/null cannot be polled: no input then.
            log::debug!("stdin not forwarded to the guest: {e:?}");
        }
    }
}

static TERM_SIGNAL: AtomicI32 = AtomicI32::new(0);
static TERM_FD: AtomicI32 = AtomicI32::new(-1);

extern "C" fn handle_term(sig: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    TERM_SIGNAL.store(sig, Ordering::SeqCst);
    let fd = TERM_FD.load(Ordering::SeqCst);
    if fd >= 0 {
        let one: u64 = 1;
        // SAFETY: write(2) is async-signal-safe; the buffer is a valid u64.
        unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
    }
}

/// SIGINT/SIGTERM -> clean VM stop while installed.
struct TerminationSignals;

impl TerminationSignals {
    fn install(wake: &EventFd) -> Self {
        TERM_FD.store(wake.as_raw_fd(), Ordering::SeqCst);
        for s in [libc::SIGINT, libc::SIGTERM] {
            // SAFETY: a zeroed sigaction is a valid starting point; the handler
            // only does async-signal-safe work (atomics and write(2)).
            let r = unsafe {
                let mut act: libc::sigaction = std::mem::zeroed();
                act.sa_sigaction = handle_term as *const () as usize;
                act.sa_flags = libc::SA_SIGINFO;
                libc::sigemptyset(&mut act.sa_mask);
                libc::sigaction(s, &act, std::ptr::null_mut())
            };
            if r != 0 {
                log::warn!(
                    "cannot handle signal {s}: {}",
                    std::io::Error::last_os_error()
                );
            }
        }
        TerminationSignals
    }

    fn take() -> Option<i32> {
        match TERM_SIGNAL.swap(0, Ordering::SeqCst) {
            0 => None,
            s => Some(s),
        }
    }
}

impl Drop for TerminationSignals {
    fn drop(&mut self) {
        TERM_FD.store(-1, Ordering::SeqCst);
    }
}

/// Peak RSS (VmHWM) of this process in KiB.
pub fn peak_rss_kib() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    s.lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// KVM capabilities milk-vmm cannot run without, with the names its error
/// message uses.
pub const REQUIRED_CAPS: &[(Cap, &str)] = &[
    (Cap::UserMemory, "user memory regions (KVM_CAP_USER_MEMORY)"),
    (Cap::Irqchip, "in-kernel irqchip (KVM_CAP_IRQCHIP)"),
    (Cap::Irqfd, "irqfd (KVM_CAP_IRQFD)"),
    (Cap::Ioeventfd, "ioeventfd (KVM_CAP_IOEVENTFD)"),
    (Cap::Pit2, "in-kernel PIT (KVM_CAP_PIT2)"),
    (Cap::SetTssAddr, "TSS address (KVM_CAP_SET_TSS_ADDR)"),
    (Cap::ExtCpuid, "KVM_GET_SUPPORTED_CPUID (KVM_CAP_EXT_CPUID)"),
    (
        Cap::ImmediateExit,
        "immediate exit (KVM_CAP_IMMEDIATE_EXIT)",
    ),
];

/// The names of the [`REQUIRED_CAPS`] that `has` says are missing.
pub fn missing_capabilities(has: impl Fn(Cap) -> bool) -> Vec<&'static str> {
    REQUIRED_CAPS
        .iter()
        .filter(|(c, _)| !has(*c))
        .map(|(_, name)| *name)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capability_check_names_what_is_missing() {
        assert!(missing_capabilities(|_| true).is_empty());
        let missing = missing_capabilities(|c| !matches!(c, Cap::Irqfd | Cap::Ioeventfd));
        assert_eq!(
            missing,
            ["irqfd (KVM_CAP_IRQFD)", "ioeventfd (KVM_CAP_IOEVENTFD)"]
        );
        assert_eq!(missing_capabilities(|_| false).len(), REQUIRED_CAPS.len());
        let e = VmmError::MissingCapabilities(missing.join(", "));
        assert_eq!(
            e.to_string(),
            "KVM lacks required capabilities: irqfd (KVM_CAP_IRQFD), ioeventfd (KVM_CAP_IOEVENTFD)"
        );
        assert_eq!(e.exit_code(), crate::error::exit_code::UNAVAILABLE);
    }

    #[test]
    fn this_hosts_kvm_has_every_required_capability() {
        // Where /dev/kvm opens (here: kvm_pvm; nested: kvm_amd) the check passes.
        let Ok(kvm) = Kvm::new() else {
            panic!("/dev/kvm is needed for the KVM tests");
        };
        assert_eq!(
            missing_capabilities(|c| kvm.check_extension(c)),
            Vec::<&str>::new()
        );
    }

    fn cfg(kernel: &std::path::Path) -> VmConfig {
        VmConfig::new(kernel)
    }

    #[test]
    fn config_validation() {
        let dir = tempfile::tempdir().unwrap();
        let k = dir.path().join("k");
        std::fs::write(&k, b"\x7fELF\x02\x01\x01").unwrap();
        assert!(cfg(&k).validate().is_ok());
        let mut c = cfg(&k);
        c.cpus = 0;
        assert_eq!(c.validate().unwrap_err().exit_code(), 64);
        c.cpus = layout::MAX_VCPUS + 1;
        assert_eq!(c.validate().unwrap_err().exit_code(), 64);
        let mut c = cfg(&k);
        c.memory_mib = 1;
        assert_eq!(c.validate().unwrap_err().exit_code(), 64);
        c.memory_mib = layout::MAX_MEMORY_MIB;
        assert_eq!(
            c.validate().unwrap_err().exit_code(),
            64,
            "more than the host has"
        );
        let c = cfg(&dir.path().join("missing"));
        assert_eq!(c.validate().unwrap_err().exit_code(), 66);
        let c = cfg(dir.path());
        assert_eq!(c.validate().unwrap_err().exit_code(), 66);
        let mut c = cfg(&k);
        c.initrd = Some(dir.path().join("nope"));
        assert_eq!(c.validate().unwrap_err().exit_code(), 66);
        // Corrupt kernel, initramfs as large as RAM.
        let junk = dir.path().join("junk");
        std::fs::write(&junk, [0x42u8; 2048]).unwrap();
        assert_eq!(cfg(&junk).validate().unwrap_err().exit_code(), 65);
        let big = dir.path().join("big");
        std::fs::File::create(&big)
            .unwrap()
            .set_len(64 << 20)
            .unwrap();
        let mut c = cfg(&k);
        c.memory_mib = 64;
        c.initrd = Some(big);
        assert_eq!(c.validate().unwrap_err().exit_code(), 65);
    }

    fn outcome(exit: ExitReason, result: Option<i32>) -> VmOutcome {
        VmOutcome {
            exit,
            result,
            console_tail: vec![],
            console: vec![],
            cmdline: String::new(),
            entry_mode: EntryMode::Pvh,
            timings: BootTimings::default(),
            peak_rss_kib: None,
        }
    }

    #[test]
    fn exit_code_of_outcomes() {
        // The guest's result wins over how the VM ended.
        assert_eq!(
            outcome_exit_code(&outcome(ExitReason::Shutdown, Some(0))),
            0
        );
        assert_eq!(outcome_exit_code(&outcome(ExitReason::Reset, Some(42))), 42);
        assert_eq!(outcome_exit_code(&outcome(ExitReason::Timeout, Some(3))), 3);
        assert_eq!(outcome_exit_code(&outcome(ExitReason::Shutdown, None)), 80);
        assert_eq!(
            outcome_exit_code(&outcome(ExitReason::SystemEvent(1), None)),
            80
        );
        assert_eq!(outcome_exit_code(&outcome(ExitReason::Timeout, None)), 124);
        assert_eq!(
            outcome_exit_code(&outcome(ExitReason::Signal(2), None)),
            130
        );
        let fault = ExitReason::GuestFault("KVM internal error".into());
        assert_eq!(outcome_exit_code(&outcome(fault, None)), 71);
        let vmm = ExitReason::VmmError("x".into());
        assert_eq!(outcome_exit_code(&outcome(vmm, None)), 70);
    }

    #[test]
    fn host_memory_is_known() {
        assert!(host_memory_mib().unwrap() > 64);
        assert!(peak_rss_kib().unwrap() > 0);
    }
}
