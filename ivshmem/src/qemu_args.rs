//! QEMU command-line pieces for a guest on this transport (see
//! `docs/transport-ivshmem.md`, "QEMU set-up"):
//!
//! ```text
//! -M pc,memory-backend=milk-ram
//! -object memory-backend-file,id=milk-ram,size=<RAM>,mem-path=<file>,share=on
//! -chardev socket,id=milk-ivs,path=<server socket>
//! -device ivshmem-doorbell,chardev=milk-ivs,vectors=<1 + num_queues>
//! ```
//!
//! `pc` (not `microvm`, which has no PCI) with its ACPI tables, so the guest
//! finds the ivshmem PCI device and, with an ACPI kernel, all its CPUs.

use std::path::{Path, PathBuf};

use milk_harness::GuestSpec;

/// Memory backend object ID.
pub const RAM_ID: &str = "milk-ram";
/// Character device ID of the server socket.
pub const CHARDEV_ID: &str = "milk-ivs";

/// The QEMU options for one guest, for `milk_harness::GuestSpec` (`machine`,
/// `memory_mib`, `extra_args`) or any other QEMU launcher.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QemuArgs {
    /// Value of `-M`.
    pub machine: String,
    /// Guest RAM in MiB (QEMU's `-m` must equal the backend size).
    pub memory_mib: u32,
    /// Everything else (`-object`, `-chardev`, `-device`).
    pub extra_args: Vec<String>,
}

/// Escapes a value for QEMU's `key=value,...` option syntax (`,` becomes `,,`).
pub fn qemu_opt_escape(s: &str) -> String {
    s.replace(',', ",,")
}

impl QemuArgs {
    /// Options for guest RAM in `ram_file` (`memory_mib` MiB), the ivshmem
    /// server at `socket` and `vectors` doorbell/MSI-X vectors.
    pub fn new(ram_file: &Path, memory_mib: u32, socket: &Path, vectors: u16) -> Self {
        let ram = qemu_opt_escape(&ram_file.display().to_string());
        let sock = qemu_opt_escape(&socket.display().to_string());
        QemuArgs {
            machine: format!("pc,memory-backend={RAM_ID}"),
            memory_mib,
            extra_args: vec![
                "-object".into(),
                format!(
                    "memory-backend-file,id={RAM_ID},size={memory_mib}M,mem-path={ram},share=on"
                ),
                "-chardev".into(),
                format!("socket,id={CHARDEV_ID},path={sock}"),
                "-device".into(),
                format!("ivshmem-doorbell,chardev={CHARDEV_ID},vectors={vectors}"),
            ],
        }
    }

    /// Sets `spec`'s machine and memory size and appends the extra arguments.
    pub fn apply(&self, spec: &mut GuestSpec) {
        spec.machine = self.machine.clone();
        spec.memory_mib = self.memory_mib;
        spec.extra_args.extend(self.extra_args.iter().cloned());
    }

    /// The arguments as one vector (`-M`, `-m` and the rest).
    pub fn to_vec(&self) -> Vec<String> {
        let mut v = vec![
            "-M".into(),
            self.machine.clone(),
            "-m".into(),
            self.memory_mib.to_string(),
        ];
        v.extend(self.extra_args.iter().cloned());
        v
    }
}

/// Default location of per-guest files: `$XDG_RUNTIME_DIR` or `/dev/shm`
/// (tmpfs, so guest RAM never hits a disk), else the temp directory.
pub fn runtime_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("XDG_RUNTIME_DIR") {
        return PathBuf::from(d);
    }
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        return shm.into();
    }
    std::env::temp_dir()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_name_the_backend_socket_and_vectors() {
        let a = QemuArgs::new(Path::new("/r/ram"), 256, Path::new("/r/s.sock"), 5);
        assert_eq!(a.machine, "pc,memory-backend=milk-ram");
        assert_eq!(
            a.extra_args,
            [
                "-object",
                "memory-backend-file,id=milk-ram,size=256M,mem-path=/r/ram,share=on",
                "-chardev",
                "socket,id=milk-ivs,path=/r/s.sock",
                "-device",
                "ivshmem-doorbell,chardev=milk-ivs,vectors=5",
            ]
        );
        let v = a.to_vec();
        assert_eq!(&v[..4], ["-M", "pc,memory-backend=milk-ram", "-m", "256"]);
    }

    #[test]
    fn commas_in_paths_are_escaped() {
        let a = QemuArgs::new(Path::new("/a,b/ram"), 64, Path::new("/c,d"), 2);
        assert!(a.extra_args[1].contains("mem-path=/a,,b/ram,share=on"));
        assert!(a.extra_args[3].ends_with("path=/c,,d"));
    }

    #[test]
    fn apply_fills_a_harness_spec() {
        let a = QemuArgs::new(Path::new("/r/ram"), 128, Path::new("/r/s"), 3);
        let mut spec = GuestSpec::new("/k");
        spec.extra_args.push("-s".into());
        a.apply(&mut spec);
        assert_eq!(spec.machine, a.machine);
        assert_eq!(spec.memory_mib, 128);
        let q = spec.qemu_args();
        let m = q.iter().position(|x| x == "-M").unwrap();
        assert_eq!(q[m + 1], "pc,memory-backend=milk-ram");
        let mem = q.iter().position(|x| x == "-m").unwrap();
        assert_eq!(q[mem + 1], "128");
        assert!(q.ends_with(&a.extra_args));
        assert_eq!(spec.extra_args[0], "-s");
    }
}
