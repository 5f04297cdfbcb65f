//! milk-policies: host-side scheduling policies for MiLK.
//!
//! Each policy implements [`virtio_milk::policy::Policy`]. Pick one with
//! [`by_name`]`("NAME[:KEY=VALUE,...]")` (what `milk-vmm --policy` does); [`list`] describes
//! every shipped policy with its version and parameters. Unknown names and bad parameters
//! are errors, never a silent fallback. [`resolve`] turns a spec into a policy factory
//! (what `milk-vmm --policy` and `milkctl swap` use).

use virtio_milk::policy::Policy;

pub mod fifo;
pub mod params;
pub mod registry;
pub mod rr;
#[cfg(test)]
mod testutil;

pub use fifo::Fifo;
pub use params::{ParamInfo, Spec};
pub use registry::{resolve, PolicyError, Resolved};
pub use rr::RoundRobin;

/// Why a policy spec was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// No policy with this name.
    #[error("unknown policy {0:?} (known: {known})", known = names().join(", "))]
    UnknownPolicy(String),
    /// Not `NAME[:KEY=VALUE[,KEY=VALUE...]]`.
    #[error("bad policy spec {0:?}: expected NAME[:KEY=VALUE[,KEY=VALUE...]]")]
    Syntax(String),
    /// The policy has no such parameter.
    #[error("policy {policy} has no parameter {param:?}")]
    UnknownParam {
        /// Policy.
        policy: String,
        /// Parameter.
        param: String,
    },
    /// A parameter given twice.
    #[error("policy {}: parameter {} given twice", .policy.escape_debug(), .param.escape_debug())]
    DuplicateParam {
        /// Policy.
        policy: String,
        /// Parameter.
        param: String,
    },
    /// A parameter value out of range or not parseable.
    #[error("policy {policy}: bad value {} for {param}: {why}", .value.escape_debug())]
    BadValue {
        /// Policy.
        policy: String,
        /// Parameter.
        param: String,
        /// Value given.
        value: String,
        /// What is wrong with it.
        why: String,
    },
}

/// Registry entry of one shipped policy.
#[derive(Clone, Copy, Debug)]
pub struct PolicyInfo {
    /// Name used in specs.
    pub name: &'static str,
    /// Policy version (bumped when its behaviour changes).
    pub version: &'static str,
    /// One-line description.
    pub description: &'static str,
    /// Parameters it accepts.
    pub params: &'static [ParamInfo],
    build: fn(&Spec) -> Result<Box<dyn Policy>, Error>,
}

const POLICIES: &[PolicyInfo] = &[
    PolicyInfo {
        name: "fifo",
        version: fifo::VERSION,
        description: "centralized global FIFO (ghOSt fifo); stages the next task on busy CPUs",
        params: fifo::PARAMS,
        build: |s| Ok(Box::new(Fifo::from_spec(s)?)),
    },
    PolicyInfo {
        name: "rr",
        version: rr::VERSION,
        description: "preemptive round robin: host timer + preempting RUN at slice end",
        params: rr::PARAMS,
        build: |s| Ok(Box::new(RoundRobin::from_spec(s)?)),
    },
];

/// Every shipped policy.
pub fn list() -> &'static [PolicyInfo] {
    POLICIES
}

/// Names accepted by [`by_name`].
pub fn names() -> Vec<&'static str> {
    POLICIES.iter().map(|p| p.name).collect()
}

/// A fresh policy instance from `NAME[:KEY=VALUE[,KEY=VALUE...]]`, e.g. `rr:slice_us=2000`.
pub fn by_name(spec: &str) -> Result<Box<dyn Policy>, Error> {
    let s = Spec::parse(spec)?;
    let info = POLICIES
        .iter()
        .find(|p| p.name == s.name)
        .ok_or_else(|| Error::UnknownPolicy(s.name.clone()))?;
    s.check_known(info.params)?;
    (info.build)(&s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_resolves_every_name_with_defaults_and_params() {
        assert!(list().len() >= 2);
        for p in list() {
            let pol = by_name(p.name).expect("listed name must resolve");
            assert_eq!(pol.name(), p.name);
            assert!(!p.version.is_empty() && !p.description.is_empty());
            // Every declared parameter accepts its documented default.
            for param in p.params {
                let spec = format!("{}:{}={}", p.name, param.name, param.default);
                assert!(by_name(&spec).is_ok(), "{spec}");
            }
        }
        assert!(by_name("rr:slice_us=500").is_ok());
    }

    #[test]
    fn unknown_names_and_bad_params_are_errors() {
        let e = by_name("nope").err().unwrap();
        assert_eq!(e, Error::UnknownPolicy("nope".into()));
        assert!(e.to_string().contains("fifo, rr"));
        assert!(matches!(
            by_name("fifo:bogus=1").err().unwrap(),
            Error::UnknownParam { .. }
        ));
        assert!(matches!(
            by_name("rr:slice_us=0").err().unwrap(),
            Error::BadValue { .. }
        ));
        assert!(matches!(by_name("rr:").err().unwrap(), Error::Syntax(_)));
    }
}
