//! Policies by spec for controllers: [`resolve`] turns `NAME[:KEY=VALUE,...]` into a policy
//! factory (what `milk-vmm --policy` and `milkctl swap` use). Parsing and validation are
//! [`crate::by_name`]'s: unknown names, unknown parameters and bad values are errors;
//! nothing falls back to another policy.

use virtio_milk::device::PolicyFactory;

use crate::{by_name, list, Error, Spec};

/// Why a policy string was refused (the registry's [`Error`]).
pub type PolicyError = Error;

/// A resolved policy string.
pub struct Resolved {
    /// The policy name (`fifo`).
    pub name: String,
    /// The string as given, normalised (`rr:slice_us=2000`; just `fifo` without params).
    pub spec: String,
    /// Makes instances.
    pub factory: PolicyFactory,
}

impl std::fmt::Debug for Resolved {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resolved")
            .field("name", &self.name)
            .field("spec", &self.spec)
            .finish_non_exhaustive()
    }
}

/// Version of the policy implementations (this crate's version; each policy also has its
/// own in [`crate::PolicyInfo::version`]).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// One line per policy for listings: description and parameters.
pub fn describe(name: &str) -> &'static str {
    list()
        .iter()
        .find(|p| p.name == name)
        .map_or("", |p| p.description)
}

/// Resolves `NAME[:PARAMS]`. See the module documentation.
pub fn resolve(spec: &str) -> Result<Resolved, PolicyError> {
    // Validates name and parameters once; the factory repeats exactly this call.
    by_name(spec)?;
    let s = Spec::parse(spec)?;
    let canon = if s.params.is_empty() {
        s.name.clone()
    } else {
        let p: Vec<String> = s.params.iter().map(|(k, v)| format!("{k}={v}")).collect();
        format!("{}:{}", s.name, p.join(","))
    };
    let c = canon.clone();
    let factory: PolicyFactory = Box::new(move || {
        // by_name is deterministic and `c` was accepted above.
        by_name(&c).expect("a resolved policy spec builds")
    });
    Ok(Resolved {
        name: s.name,
        spec: canon,
        factory,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_to_factories_and_refuses_bad_specs() {
        let r = resolve(" rr:slice_us=500 , guest_slice_us=9000").unwrap();
        assert_eq!(r.name, "rr");
        assert_eq!(r.spec, "rr:slice_us=500,guest_slice_us=9000");
        assert_eq!((r.factory)().name(), "rr");
        assert_eq!(resolve("fifo").unwrap().spec, "fifo");
        assert!(matches!(resolve("nope"), Err(Error::UnknownPolicy(_))));
        assert!(matches!(
            resolve("fifo:slice_us=x"),
            Err(Error::BadValue { .. })
        ));
        assert!(!describe("fifo").is_empty());
        assert_eq!(describe("nope"), "");
    }
}
