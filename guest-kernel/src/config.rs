//! The kernel config fragment (`guest-kernel/config/milk.config`) and the
//! check that `olddefconfig` kept every option it asks for.

use std::collections::BTreeMap;
use std::path::Path;

use crate::Error;

/// What a config line asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Setting {
    /// `CONFIG_X=value` (y, m, a number or a quoted string).
    Value(String),
    /// `# CONFIG_X is not set`.
    Unset,
}

/// A parsed `.config` or fragment: option name -> setting.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KConfig {
    /// Options by name (with the `CONFIG_` prefix).
    pub options: BTreeMap<String, Setting>,
}

impl KConfig {
    /// Parses Kconfig syntax; other comments and blank lines are skipped.
    pub fn parse(text: &str) -> Result<Self, Error> {
        let mut options = BTreeMap::new();
        for (no, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if let Some(rest) = line.strip_prefix("# ") {
                if let Some(name) = rest.strip_suffix(" is not set") {
                    if name.starts_with("CONFIG_") {
                        options.insert(name.to_string(), Setting::Unset);
                    }
                }
                continue;
            }
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (name, value) = line
                .split_once('=')
                .filter(|(n, v)| n.starts_with("CONFIG_") && !v.is_empty())
                .ok_or_else(|| {
                    Error::Config(format!("line {}: not CONFIG_X=value: {line}", no + 1))
                })?;
            options.insert(name.to_string(), Setting::Value(value.to_string()));
        }
        Ok(KConfig { options })
    }

    /// Reads and parses a file.
    pub fn load(path: &Path) -> Result<Self, Error> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::parse(&text)
    }

    /// The options of `fragment` that this (full) config does not honour, as
    /// human-readable lines: `CONFIG_X: wanted y, got <unset>`.
    pub fn violations(&self, fragment: &KConfig) -> Vec<String> {
        let mut out = Vec::new();
        for (name, want) in &fragment.options {
            let got = self.options.get(name);
            let ok = match (want, got) {
                (Setting::Value(w), Some(Setting::Value(g))) => w == g,
                (Setting::Value(_), _) => false,
                (Setting::Unset, None | Some(Setting::Unset)) => true,
                (Setting::Unset, Some(Setting::Value(v))) => v == "n",
            };
            if !ok {
                let show = |s: Option<&Setting>| match s {
                    Some(Setting::Value(v)) => v.clone(),
                    Some(Setting::Unset) | None => "<unset>".to_string(),
                };
                out.push(format!(
                    "{name}: wanted {}, got {}",
                    show(Some(want)),
                    show(got)
                ));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_values_unset_and_skips_comments() {
        let c =
            KConfig::parse("# hi\nCONFIG_A=y\n# CONFIG_B is not set\nCONFIG_S=\"-x\"\n\n").unwrap();
        assert_eq!(c.options["CONFIG_A"], Setting::Value("y".into()));
        assert_eq!(c.options["CONFIG_B"], Setting::Unset);
        assert_eq!(c.options["CONFIG_S"], Setting::Value("\"-x\"".into()));
        assert_eq!(c.options.len(), 3);
    }

    #[test]
    fn rejects_garbage_lines() {
        assert!(KConfig::parse("SMP=y").is_err());
        assert!(KConfig::parse("CONFIG_A=").is_err());
        assert!(KConfig::parse("CONFIG_A").is_err());
    }

    #[test]
    fn violations_name_dropped_and_changed_options() {
        let frag =
            KConfig::parse("CONFIG_A=y\nCONFIG_B=y\nCONFIG_N=16\n# CONFIG_C is not set\n").unwrap();
        let full = KConfig::parse("CONFIG_A=y\nCONFIG_N=8\nCONFIG_C=y\n").unwrap();
        let v = full.violations(&frag);
        assert_eq!(
            v,
            vec![
                "CONFIG_B: wanted y, got <unset>".to_string(),
                "CONFIG_C: wanted <unset>, got y".to_string(),
                "CONFIG_N: wanted 16, got 8".to_string(),
            ]
        );
        assert!(frag.violations(&frag).is_empty());
    }

    #[test]
    fn the_fragment_asks_for_what_milk_needs() {
        let frag = KConfig::load(&crate::fragment_path()).unwrap();
        for name in [
            "CONFIG_64BIT",
            "CONFIG_SMP",
            "CONFIG_SERIAL_8250_CONSOLE",
            "CONFIG_BLK_DEV_INITRD",
            "CONFIG_DEVTMPFS",
            "CONFIG_PROC_FS",
            "CONFIG_SYSFS",
            "CONFIG_VIRTIO_MMIO",
            "CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES",
            "CONFIG_PCI_MSI",
            "CONFIG_PVH",
            "CONFIG_SCHED_CLASS_EXT",
            "CONFIG_X86_MPPARSE",
            "CONFIG_KVM_GUEST",
        ] {
            assert_eq!(
                frag.options.get(name),
                Some(&Setting::Value("y".into())),
                "{name}"
            );
        }
    }
}
