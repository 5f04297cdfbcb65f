//! milk-policies: host-side scheduling policies for MiLK.
//!
//! Each policy implements [`virtio_milk::policy::Policy`]; pick one by name with
//! [`by_name`] (what `milk-vmm --policy <name>` does). [`names`] lists them.

use virtio_milk::policy::Policy;

pub mod fifo;

pub use fifo::Fifo;

/// Names accepted by [`by_name`].
pub fn names() -> &'static [&'static str] {
    &["fifo"]
}

/// A fresh policy instance by registry name, or `None` if unknown.
pub fn by_name(name: &str) -> Option<Box<dyn Policy>> {
    match name {
        "fifo" => Some(Box::new(Fifo::default())),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_resolves_every_name() {
        for n in names() {
            let p = by_name(n).expect("listed name must resolve");
            assert_eq!(p.name(), *n);
        }
        assert!(by_name("nope").is_none());
    }
}
