//! milk-policies: host-side scheduling policies for MiLK.
//!
//! Each policy implements [`virtio_milk::policy::Policy`]; pick one by name with
//! [`by_name`]; [`names`] lists them. [`resolve`] turns `NAME[:PARAMS]` into a policy
//! factory (what `milk-vmm --policy` and `milkctl swap` use).

use virtio_milk::policy::Policy;

pub mod fifo;
pub mod registry;

pub use fifo::Fifo;
pub use registry::{resolve, PolicyError, Resolved};

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
