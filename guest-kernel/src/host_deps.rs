//! Host packages the project needs, and installing them when they are missing.
//!
//! Everything MiLK builds or boots comes from Debian packages: the kernel
//! source tarball, the kernel's build tools, busybox for the initramfs and
//! QEMU for the TCG engine. [`ensure`] checks for each one by a file it
//! installs; when some are missing it runs `apt-get install` if we are root,
//! and otherwise prints the exact command and fails.

use std::path::Path;
use std::process::Command;

use crate::Error;

/// One Debian package and a file whose presence shows it is installed.
#[derive(Debug, Clone, Copy)]
pub struct Package {
    /// Debian package name.
    pub name: &'static str,
    /// A file the package installs (absolute path).
    pub probe: &'static str,
}

/// Everything the kernel, initramfs and QEMU engine need.
pub const PACKAGES: &[Package] = &[
    Package {
        name: "linux-source-6.12",
        probe: "/usr/src/linux-source-6.12.tar.xz",
    },
    Package {
        name: "make",
        probe: "/usr/bin/make",
    },
    Package {
        name: "gcc",
        probe: "/usr/bin/gcc",
    },
    Package {
        name: "flex",
        probe: "/usr/bin/flex",
    },
    Package {
        name: "bison",
        probe: "/usr/bin/bison",
    },
    Package {
        name: "bc",
        probe: "/usr/bin/bc",
    },
    Package {
        name: "libelf-dev",
        probe: "/usr/include/libelf.h",
    },
    Package {
        name: "libssl-dev",
        probe: "/usr/include/openssl/ssl.h",
    },
    Package {
        name: "dwarves",
        probe: "/usr/bin/pahole",
    },
    Package {
        name: "xz-utils",
        probe: "/usr/bin/xz",
    },
    Package {
        name: "patch",
        probe: "/usr/bin/patch",
    },
    Package {
        name: "cpio",
        probe: "/usr/bin/cpio",
    },
    Package {
        name: "busybox-static",
        probe: "/bin/busybox",
    },
    Package {
        name: "qemu-system-x86",
        probe: "/usr/bin/qemu-system-x86_64",
    },
    Package {
        name: "qemu-system-data",
        probe: "/usr/share/qemu/qboot.rom",
    },
];

/// The packages of `wanted` whose probe file is missing.
pub fn missing(wanted: &[Package]) -> Vec<Package> {
    wanted
        .iter()
        .filter(|p| !Path::new(p.probe).exists())
        .copied()
        .collect()
}

/// The command a user runs to install `pkgs`.
pub fn install_command(pkgs: &[Package]) -> String {
    let names: Vec<&str> = pkgs.iter().map(|p| p.name).collect();
    format!("apt-get update && apt-get install -y {}", names.join(" "))
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Makes sure every package in [`PACKAGES`] is installed.
///
/// Installs missing ones with apt-get when running as root; otherwise
/// returns [`Error::MissingPackages`] carrying the command to run.
pub fn ensure() -> Result<(), Error> {
    ensure_packages(PACKAGES)
}

/// Makes sure every package in `wanted` is installed, as [`ensure`] does for
/// [`PACKAGES`] (other crates name the extra packages they need).
pub fn ensure_packages(wanted: &[Package]) -> Result<(), Error> {
    let absent = missing(wanted);
    if absent.is_empty() {
        return Ok(());
    }
    let cmd = install_command(&absent);
    if !is_root() {
        return Err(Error::MissingPackages(cmd));
    }
    log::info!("installing missing host packages: {cmd}");
    let status = Command::new("sh")
        .arg("-c")
        .arg(&cmd)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .map_err(|e| Error::Tool("sh".into(), e.to_string()))?;
    let still = missing(wanted);
    if !status.success() || !still.is_empty() {
        return Err(Error::MissingPackages(install_command(&still)));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_reports_absent_probe_files_only() {
        let pkgs = [
            Package {
                name: "present",
                probe: "/",
            },
            Package {
                name: "absent",
                probe: "/nonexistent/milk/probe",
            },
        ];
        let m = missing(&pkgs);
        assert_eq!(m.len(), 1);
        assert_eq!(m[0].name, "absent");
    }

    #[test]
    fn install_command_names_every_package() {
        let pkgs = [
            Package {
                name: "a",
                probe: "/x",
            },
            Package {
                name: "b",
                probe: "/y",
            },
        ];
        assert_eq!(
            install_command(&pkgs),
            "apt-get update && apt-get install -y a b"
        );
    }

    #[test]
    fn every_probe_is_an_absolute_path() {
        for p in PACKAGES {
            assert!(p.probe.starts_with('/'), "{} probe {}", p.name, p.probe);
        }
    }
}
