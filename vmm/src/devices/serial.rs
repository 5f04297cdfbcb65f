//! COM1: a vm-superio 16550A whose interrupt is an irqfd and whose output is
//! split into lines for the console, the serial log and the result-line scan.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::devices::BusDevice;

/// Console lines kept for error reports.
pub const TAIL_LINES: usize = 40;
/// Most console lines kept in memory in total.
pub const MAX_LINES: usize = 20_000;

/// Interrupt trigger backed by an eventfd registered as a KVM irqfd.
pub struct EventFdTrigger(pub EventFd);

impl Trigger for EventFdTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// Callback run for every complete console line.
pub type LineCallback = Box<dyn FnMut(&str) + Send>;

struct ConsoleInner {
    partial: Vec<u8>,
    lines: Vec<String>,
    dropped_lines: usize,
    result: Option<i32>,
    echo: bool,
    log: Option<BufWriter<File>>,
    on_line: Option<LineCallback>,
    first_byte: Option<Instant>,
}

/// The guest console: collects serial output. Cloning shares it.
#[derive(Clone)]
pub struct Console {
    inner: Arc<Mutex<ConsoleInner>>,
}

impl Console {
    /// New console; `echo` copies output to stdout, `log` receives every byte.
    pub fn new(echo: bool, log: Option<File>) -> Self {
        Console {
            inner: Arc::new(Mutex::new(ConsoleInner {
                partial: Vec::new(),
                lines: Vec::new(),
                dropped_lines: 0,
                result: None,
                echo,
                log: log.map(BufWriter::new),
                on_line: None,
                first_byte: None,
            })),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ConsoleInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sets the per-line callback.
    pub fn set_line_callback(&self, cb: LineCallback) {
        self.lock().on_line = Some(cb);
    }

    /// The first `MILK-RESULT status=<n>` the guest printed.
    pub fn result(&self) -> Option<i32> {
        self.lock().result
    }

    /// All complete lines kept so far (at most [`MAX_LINES`]).
    pub fn lines(&self) -> Vec<String> {
        self.lock().lines.clone()
    }

    /// The last `n` complete lines plus any unterminated one.
    pub fn tail(&self, n: usize) -> Vec<String> {
        let g = self.lock();
        let mut v: VecDeque<String> = g.lines.iter().rev().take(n).cloned().collect();
        let mut out: Vec<String> = v.drain(..).rev().collect();
        if !g.partial.is_empty() {
            out.push(String::from_utf8_lossy(&g.partial).into_owned());
        }
        out
    }

    /// When the guest wrote its first byte.
    pub fn first_byte_at(&self) -> Option<Instant> {
        self.lock().first_byte
    }

    /// Writes out any unterminated line and flushes the log.
    pub fn flush(&self) {
        let mut g = self.lock();
        if !g.partial.is_empty() {
            let line = String::from_utf8_lossy(&g.partial).into_owned();
            g.partial.clear();
            finish_line(&mut g, line);
        }
        if let Some(l) = g.log.as_mut() {
            if let Err(e) = l.flush() {
                log::warn!("cannot flush serial log: {e}");
            }
        }
        if g.echo {
            let _ = std::io::stdout().flush();
        }
    }

    fn push_bytes(&self, buf: &[u8]) {
        let mut g = self.lock();
        if g.first_byte.is_none() && !buf.is_empty() {
            g.first_byte = Some(Instant::now());
        }
        if g.echo {
            // Unbuffered: the console shows every byte as the guest writes it.
            let mut out = std::io::stdout().lock();
            let _ = out.write_all(buf);
            let _ = out.flush();
        }
        if let Some(l) = g.log.as_mut() {
            if let Err(e) = l.write_all(buf) {
                log::warn!("cannot write serial log: {e}");
            }
        }
        for &b in buf {
            if b == b'\n' {
                let raw = std::mem::take(&mut g.partial);
                let line = String::from_utf8_lossy(&raw)
                    .trim_end_matches('\r')
                    .to_string();
                finish_line(&mut g, line);
                if let Some(l) = g.log.as_mut() {
                    let _ = l.flush();
                }
            } else {
                g.partial.push(b);
            }
        }
    }
}

fn finish_line(g: &mut ConsoleInner, line: String) {
    if g.result.is_none() {
        if let Some(r) = milk_harness::parse_result_line(&line) {
            log::debug!("guest result line: status={}", r.status);
            g.result = Some(r.status);
        }
    }
    if let Some(cb) = g.on_line.as_mut() {
        cb(&line);
    }
    if g.lines.len() >= MAX_LINES {
        g.lines.remove(0);
        g.dropped_lines += 1;
    }
    g.lines.push(line);
}

/// `Write` end handed to the UART.
pub struct ConsoleWriter(Console);

impl Write for ConsoleWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.push_bytes(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The COM1 device on the port-I/O bus.
pub struct SerialDevice {
    serial: Serial<EventFdTrigger, NoEvents, ConsoleWriter>,
}

impl SerialDevice {
    /// UART raising `irq_evt` and writing to `console`.
    pub fn new(irq_evt: EventFd, console: Console) -> Self {
        SerialDevice {
            serial: Serial::new(EventFdTrigger(irq_evt), ConsoleWriter(console)),
        }
    }

    /// Queues host input for the guest to read.
    pub fn enqueue_input(&mut self, bytes: &[u8]) {
        if let Err(e) = self.serial.enqueue_raw_bytes(bytes) {
            log::warn!("serial input dropped: {e:?}");
        }
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if data.len() != 1 || offset > 7 {
            log::debug!("serial: ignoring {}-byte read at +{offset}", data.len());
            data.fill(0xff);
            return;
        }
        data[0] = self.serial.read(offset as u8);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() != 1 || offset > 7 {
            log::debug!("serial: ignoring {}-byte write at +{offset}", data.len());
            return;
        }
        if let Err(e) = self.serial.write(offset as u8, data[0]) {
            log::warn!("serial write failed: {e:?}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    #[test]
    fn lines_result_and_log() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("serial.log");
        let console = Console::new(false, Some(File::create(&path).unwrap()));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s2 = seen.clone();
        console.set_line_callback(Box::new(move |l| s2.lock().unwrap().push(l.to_string())));
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut dev = SerialDevice::new(evt.try_clone().unwrap(), console.clone());
        for b in b"hello\r\nMILK-RESULT status=3\nMILK-RESULT status=4\npartial" {
            dev.write(0, &[*b]);
        }
        assert_eq!(console.result(), Some(3), "first result line wins");
        assert_eq!(
            *seen.lock().unwrap(),
            vec!["hello", "MILK-RESULT status=3", "MILK-RESULT status=4"]
        );
        assert_eq!(console.tail(1), vec!["MILK-RESULT status=4", "partial"]);
        assert!(console.first_byte_at().is_some());
        console.flush();
        assert_eq!(console.lines().last().unwrap(), "partial");
        let mut s = String::new();
        File::open(&path).unwrap().read_to_string(&mut s).unwrap();
        assert!(s.starts_with("hello\r\nMILK-RESULT status=3\n"));
        assert!(s.ends_with("partial"));
    }

    #[test]
    fn thr_interrupt_fires_irqfd_when_enabled() {
        let console = Console::new(false, None);
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut dev = SerialDevice::new(evt.try_clone().unwrap(), console);
        // IER: enable THR-empty interrupt.
        dev.write(1, &[0x02]);
        assert!(evt.read().is_ok(), "enabling THRE raises the interrupt");
        // Reading IIR acknowledges the pending THRE interrupt.
        let mut iir = [0u8];
        dev.read(2, &mut iir);
        assert_eq!(iir[0] & 0x0f, 0x02, "IIR reports THR empty");
        dev.write(0, b"x");
        assert!(evt.read().is_ok(), "each transmitted byte raises it again");
        // LSR reports transmitter empty.
        let mut lsr = [0u8];
        dev.read(5, &mut lsr);
        assert_eq!(lsr[0] & 0x60, 0x60);
    }

    #[test]
    fn input_is_readable_by_guest() {
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut dev = SerialDevice::new(evt, Console::new(false, None));
        dev.enqueue_input(b"ok");
        let mut b = [0u8];
        dev.read(0, &mut b);
        assert_eq!(b[0], b'o');
        dev.read(0, &mut b);
        assert_eq!(b[0], b'k');
    }

    #[test]
    fn bad_accesses_are_ignored() {
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        let console = Console::new(false, None);
        let mut dev = SerialDevice::new(evt, console.clone());
        dev.write(0, b"ab");
        let mut two = [0u8; 2];
        dev.read(0, &mut two);
        assert_eq!(two, [0xff, 0xff]);
        assert!(console.first_byte_at().is_none());
    }
}
