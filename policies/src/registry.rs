//! Policies by name: the one place a `NAME[:PARAMS]` string becomes a policy factory.
//!
//! `PARAMS` is a comma-separated list of `key=value`. A name that is not in [`names`], a
//! parameter the policy does not take, or a value that does not parse is an error; nothing
//! falls back to another policy.
//!
//! | policy | parameters |
//! | --- | --- |
//! | `fifo` | `slice_us=N`: slice of every RUN in microseconds (default: the runtime's) |

use virtio_milk::device::PolicyFactory;

use crate::{by_name, names, Fifo};

/// Why a policy string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// No policy of that name.
    #[error("unknown policy {name:?} (known: {known})")]
    Unknown {
        /// The name asked for.
        name: String,
        /// The known names, comma separated.
        known: String,
    },
    /// The policy has no such parameter.
    #[error("policy {policy} has no parameter {param:?}")]
    UnknownParam {
        /// Policy name.
        policy: String,
        /// The parameter given.
        param: String,
    },
    /// A parameter value does not parse or is out of range.
    #[error("policy {policy}: bad value for {param}: {value:?}")]
    BadValue {
        /// Policy name.
        policy: String,
        /// Parameter.
        param: String,
        /// Value given.
        value: String,
    },
    /// Not `key=value`.
    #[error("policy parameters must be key=value, got {0:?}")]
    Syntax(String),
}

/// A resolved policy string.
pub struct Resolved {
    /// The policy name (`fifo`).
    pub name: String,
    /// The string as given, normalised (`fifo:slice_us=2000`; just `fifo` without params).
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

/// Version of the policy implementations (this crate's version).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// One line per policy for listings: name and parameters.
pub fn describe(name: &str) -> &'static str {
    match name {
        "fifo" => "centralized global FIFO; params: slice_us=N",
        _ => "",
    }
}

fn parse_params(spec: &str) -> Result<Vec<(String, String)>, PolicyError> {
    spec.split(',')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_owned(), v.trim().to_owned())),
            _ => Err(PolicyError::Syntax(p.to_owned())),
        })
        .collect()
}

/// Resolves `NAME[:PARAMS]`. See the module documentation.
pub fn resolve(spec: &str) -> Result<Resolved, PolicyError> {
    let spec = spec.trim();
    let (name, params) = match spec.split_once(':') {
        Some((n, p)) => (n.trim(), p),
        None => (spec, ""),
    };
    if by_name(name).is_none() {
        return Err(PolicyError::Unknown {
            name: name.to_owned(),
            known: names().join(", "),
        });
    }
    let params = parse_params(params)?;
    let canon = if params.is_empty() {
        name.to_owned()
    } else {
        let p: Vec<String> = params.iter().map(|(k, v)| format!("{k}={v}")).collect();
        format!("{name}:{}", p.join(","))
    };
    let factory: PolicyFactory = match name {
        "fifo" => {
            let mut slice_ns = 0u64;
            for (k, v) in &params {
                match k.as_str() {
                    "slice_us" => {
                        slice_ns = v
                            .parse::<u64>()
                            .ok()
                            .filter(|&us| (1..=10_000_000).contains(&us))
                            .map(|us| us * 1000)
                            .ok_or_else(|| PolicyError::BadValue {
                                policy: name.into(),
                                param: k.clone(),
                                value: v.clone(),
                            })?
                    }
                    _ => {
                        return Err(PolicyError::UnknownParam {
                            policy: name.into(),
                            param: k.clone(),
                        })
                    }
                }
            }
            Box::new(move || {
                let mut f = Fifo::default();
                f.slice_ns = slice_ns;
                Box::new(f)
            })
        }
        other => {
            if let Some((k, _)) = params.first() {
                return Err(PolicyError::UnknownParam {
                    policy: other.into(),
                    param: k.clone(),
                });
            }
            let n = other.to_owned();
            // `by_name(n)` resolved above; the registry is static.
            Box::new(move || by_name(&n).expect("registered policy"))
        }
    };
    Ok(Resolved {
        name: name.to_owned(),
        spec: canon,
        factory,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_params_resolve() {
        for n in names() {
            let r = resolve(n).unwrap();
            assert_eq!(r.spec, *n);
            assert_eq!((r.factory)().name(), *n);
        }
        let r = resolve(" fifo:slice_us=2000 ").unwrap();
        assert_eq!(r.name, "fifo");
        assert_eq!(r.spec, "fifo:slice_us=2000");
        assert_eq!((r.factory)().name(), "fifo");
        assert_eq!(resolve("fifo:").unwrap().spec, "fifo");
    }

    #[test]
    fn nothing_falls_back() {
        let e = resolve("nope").unwrap_err();
        assert!(matches!(e, PolicyError::Unknown { ref name, .. } if name == "nope"));
        assert!(e.to_string().contains("fifo"), "{e}");
        assert!(matches!(
            resolve("fifo:quantum=3"),
            Err(PolicyError::UnknownParam { .. })
        ));
        for bad in ["fifo:slice_us=0", "fifo:slice_us=x", "fifo:slice_us=-1"] {
            assert!(
                matches!(resolve(bad), Err(PolicyError::BadValue { .. })),
                "{bad}"
            );
        }
        assert!(matches!(
            resolve("fifo:slice_us"),
            Err(PolicyError::Syntax(_))
        ));
        assert!(matches!(resolve(""), Err(PolicyError::Unknown { .. })));
    }
}
