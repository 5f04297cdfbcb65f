//! Engine selection: KVM (milk-vmm's own VMM) when it can run a standard guest,
//! otherwise QEMU TCG, with the same kernel, initramfs and command line.

use std::path::Path;

use crate::error::LaunchError;

/// Engine requested on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EngineChoice {
    /// KVM if it can run a standard guest, else QEMU.
    Auto,
    /// KVM, even if it is kvm_pvm.
    Kvm,
    /// QEMU TCG.
    Qemu,
}

/// What this host's /dev/kvm can do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KvmSupport {
    /// A hardware-assisted KVM (VMX/SVM): standard guests run.
    Standard,
    /// kvm_pvm: a PVM hypervisor; a standard kernel's ring-0 code is emulated
    /// and stops at its first exception.
    Pvm,
    /// No usable /dev/kvm (the text says why).
    Missing(String),
}

/// The engine that will run the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Engine {
    /// milk-vmm's own KVM VMM.
    Kvm,
    /// QEMU TCG through milk-harness.
    Qemu,
}

impl Engine {
    /// Lower-case name (`kvm`, `qemu`).
    pub fn name(self) -> &'static str {
        match self {
            Engine::Kvm => "kvm",
            Engine::Qemu => "qemu",
        }
    }
}

/// Probes /dev/kvm and the kvm_pvm module.
pub fn detect_kvm() -> KvmSupport {
    detect_kvm_at(Path::new("/dev/kvm"), Path::new("/sys/module/kvm_pvm"))
}

/// [`detect_kvm`] with explicit paths (for tests).
pub fn detect_kvm_at(dev: &Path, pvm_module: &Path) -> KvmSupport {
    if let Err(e) = std::fs::OpenOptions::new().read(true).write(true).open(dev) {
        return KvmSupport::Missing(format!("cannot open {}: {e}", dev.display()));
    }
    if pvm_module.exists() {
        return KvmSupport::Pvm;
    }
    KvmSupport::Standard
}

/// Picks the engine; the returned line explains the choice when it is not
/// plain KVM (log it once).
pub fn choose_engine(
    choice: EngineChoice,
    support: &KvmSupport,
) -> Result<(Engine, Option<String>), LaunchError> {
    match (choice, support) {
        (EngineChoice::Qemu, _) => Ok((Engine::Qemu, Some("engine: QEMU TCG (requested)".into()))),
        (EngineChoice::Auto, KvmSupport::Standard) | (EngineChoice::Kvm, KvmSupport::Standard) => {
            Ok((Engine::Kvm, None))
        }
        (EngineChoice::Auto, KvmSupport::Pvm) => Ok((
            Engine::Qemu,
            Some(
                "engine: /dev/kvm is kvm_pvm (/sys/module/kvm_pvm), which cannot run a standard \
                 kernel's ring-0 code; running the guest under QEMU TCG instead"
                    .into(),
            ),
        )),
        (EngineChoice::Auto, KvmSupport::Missing(why)) => Ok((
            Engine::Qemu,
            Some(format!(
                "engine: no usable KVM ({why}); running the guest under QEMU TCG instead"
            )),
        )),
        (EngineChoice::Kvm, KvmSupport::Pvm) => Ok((
            Engine::Kvm,
            Some(
                "engine: KVM requested on kvm_pvm: a standard kernel stops at its first \
                 exception (only ring-3 code runs natively)"
                    .into(),
            ),
        )),
        (EngineChoice::Kvm, KvmSupport::Missing(why)) => {
            Err(LaunchError::KvmUnavailable(why.clone()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detection_from_paths() {
        let dir = tempfile::tempdir().unwrap();
        let dev = dir.path().join("kvm");
        let pvm = dir.path().join("kvm_pvm");
        assert!(
            matches!(detect_kvm_at(&dev, &pvm), KvmSupport::Missing(m) if m.contains("cannot open"))
        );
        std::fs::write(&dev, b"").unwrap();
        assert_eq!(detect_kvm_at(&dev, &pvm), KvmSupport::Standard);
        std::fs::create_dir(&pvm).unwrap();
        assert_eq!(detect_kvm_at(&dev, &pvm), KvmSupport::Pvm);
    }

    #[test]
    fn choice_matrix() {
        use EngineChoice::*;
        let missing = KvmSupport::Missing("x".into());
        assert_eq!(
            choose_engine(Auto, &KvmSupport::Standard).unwrap(),
            (Engine::Kvm, None)
        );
        let (e, why) = choose_engine(Auto, &KvmSupport::Pvm).unwrap();
        assert_eq!(e, Engine::Qemu);
        assert!(why.unwrap().contains("kvm_pvm"));
        assert_eq!(choose_engine(Auto, &missing).unwrap().0, Engine::Qemu);
        assert_eq!(choose_engine(Kvm, &KvmSupport::Pvm).unwrap().0, Engine::Kvm);
        assert_eq!(choose_engine(Kvm, &missing).unwrap_err().exit_code(), 69);
        assert_eq!(
            choose_engine(Qemu, &KvmSupport::Standard).unwrap().0,
            Engine::Qemu
        );
    }

    #[test]
    fn this_host_is_detected_consistently() {
        let s = detect_kvm();
        if Path::new("/sys/module/kvm_pvm").exists() && Path::new("/dev/kvm").exists() {
            assert_eq!(s, KvmSupport::Pvm);
        }
    }
}
