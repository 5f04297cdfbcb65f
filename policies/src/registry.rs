//! Policy factories from `NAME[:PARAMS]` strings: what `milk-vmm --policy`, the control
//! socket's `swap` and the ivshmem session use. Parsing and validation are [`crate::by_name`]'s
//! (one registry, [`crate::list`]); this module only turns a validated spec into a factory
//! that makes fresh instances of the same policy with the same parameters.

use virtio_milk::device::PolicyFactory;

use crate::{by_name, list, Error, Spec};

/// Why a policy string was refused (the registry's error).
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

/// The one-line description of policy `name` ("" if unknown).
pub fn describe(name: &str) -> &'static str {
    list()
        .iter()
        .find(|p| p.name == name)
        .map_or("", |p| p.description)
}

/// Resolves `NAME[:PARAMS]`: unknown names, unknown parameters and bad values are errors.
pub fn resolve(spec: &str) -> Result<Resolved, Error> {
    let parsed = Spec::parse(spec)?;
    // Building one instance runs every check the policy makes on its parameters.
    by_name(spec)?;
    let canon = if parsed.params.is_empty() {
        parsed.name.clone()
    } else {
        let p: Vec<String> = parsed
            .params
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        format!("{}:{}", parsed.name, p.join(","))
    };
    let again = canon.clone();
    let factory: PolicyFactory = Box::new(move || {
        // by_name is a pure function of the spec, which was accepted above.
        by_name(&again).expect("a spec accepted once is accepted again")
    });
    Ok(Resolved {
        name: parsed.name,
        spec: canon,
        factory,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::names;

    #[test]
    fn names_and_params_resolve() {
        for n in names() {
            let r = resolve(n).unwrap();
            assert_eq!(r.spec, n);
            assert_eq!((r.factory)().name(), n);
            assert!(!describe(n).is_empty());
        }
        let r = resolve(" fifo:slice_us=2000 ").unwrap();
        assert_eq!(r.name, "fifo");
        assert_eq!(r.spec, "fifo:slice_us=2000");
        assert_eq!((r.factory)().name(), "fifo");
    }

    #[test]
    fn nothing_falls_back() {
        let e = resolve("nope").unwrap_err();
        assert!(matches!(e, Error::UnknownPolicy(ref name) if name == "nope"));
        assert!(e.to_string().contains("fifo"), "{e}");
        assert!(matches!(
            resolve("fifo:quantum=3"),
            Err(Error::UnknownParam { .. })
        ));
        assert!(matches!(resolve("fifo:slice_us"), Err(Error::Syntax(_))));
        assert!(resolve("").is_err());
        assert_eq!(describe("nope"), "");
    }
}
