//! `NAME[:KEY=VALUE[,KEY=VALUE...]]` policy specs: parsing and typed parameter access.

use crate::Error;

/// One declared parameter of a policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ParamInfo {
    /// Key, e.g. `slice_us`.
    pub name: &'static str,
    /// Default value as text.
    pub default: &'static str,
    /// One-line description.
    pub help: &'static str,
}

/// A parsed spec: the policy name and its `key=value` pairs in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Spec {
    /// Policy name.
    pub name: String,
    /// Parameters as given.
    pub params: Vec<(String, String)>,
}

impl Spec {
    /// Parse `NAME[:KEY=VALUE[,KEY=VALUE...]]`.
    pub fn parse(spec: &str) -> Result<Self, Error> {
        let spec = spec.trim();
        let (name, rest) = match spec.split_once(':') {
            Some((n, r)) => (n, Some(r)),
            None => (spec, None),
        };
        if name.is_empty() {
            return Err(Error::Syntax(spec.to_owned()));
        }
        let mut params = Vec::new();
        if let Some(rest) = rest {
            for kv in rest.split(',') {
                let Some((k, v)) = kv.split_once('=') else {
                    return Err(Error::Syntax(spec.to_owned()));
                };
                let (k, v) = (k.trim(), v.trim());
                if k.is_empty() || v.is_empty() {
                    return Err(Error::Syntax(spec.to_owned()));
                }
                if params.iter().any(|(p, _): &(String, String)| p == k) {
                    return Err(Error::DuplicateParam {
                        policy: name.to_owned(),
                        param: k.to_owned(),
                    });
                }
                params.push((k.to_owned(), v.to_owned()));
            }
        }
        Ok(Spec {
            name: name.to_owned(),
            params,
        })
    }

    /// Fail on any key not in `known`.
    pub fn check_known(&self, known: &[ParamInfo]) -> Result<(), Error> {
        for (k, _) in &self.params {
            if !known.iter().any(|p| p.name == k) {
                return Err(Error::UnknownParam {
                    policy: self.name.clone(),
                    param: k.clone(),
                });
            }
        }
        Ok(())
    }

    /// An unsigned integer parameter in `min..=max`, or `default` if absent.
    pub fn u64_in(&self, key: &str, default: u64, min: u64, max: u64) -> Result<u64, Error> {
        let Some((_, v)) = self.params.iter().find(|(k, _)| k == key) else {
            return Ok(default);
        };
        let bad = |why: String| Error::BadValue {
            policy: self.name.clone(),
            param: key.to_owned(),
            value: v.clone(),
            why,
        };
        let n: u64 = v
            .parse()
            .map_err(|_| bad("not an unsigned integer".into()))?;
        if n < min || n > max {
            return Err(bad(format!("must be in {min}..={max}")));
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: &[ParamInfo] = &[ParamInfo {
        name: "slice_us",
        default: "2000",
        help: "",
    }];

    #[test]
    fn parses_names_and_params() {
        assert_eq!(
            Spec::parse("rr").unwrap(),
            Spec {
                name: "rr".into(),
                params: vec![]
            }
        );
        let s = Spec::parse("rr:slice_us=500, x=y").unwrap();
        assert_eq!(s.name, "rr");
        assert_eq!(
            s.params,
            vec![("slice_us".into(), "500".into()), ("x".into(), "y".into())]
        );
        assert!(matches!(
            s.check_known(P),
            Err(Error::UnknownParam { param, .. }) if param == "x"
        ));
        assert_eq!(s.u64_in("slice_us", 1, 100, 1000).unwrap(), 500);
        assert_eq!(s.u64_in("other", 7, 1, 10).unwrap(), 7);
    }

    #[test]
    fn rejects_bad_syntax_and_values() {
        for bad in [
            "",
            ":a=1",
            "rr:",
            "rr:slice_us",
            "rr:=3",
            "rr:a=1,",
            "rr:a=",
        ] {
            assert!(Spec::parse(bad).is_err(), "{bad:?}");
        }
        assert!(matches!(
            Spec::parse("rr:a=1,a=2"),
            Err(Error::DuplicateParam { .. })
        ));
        let s = Spec::parse("rr:slice_us=abc").unwrap();
        assert!(matches!(
            s.u64_in("slice_us", 1, 1, 10),
            Err(Error::BadValue { .. })
        ));
        let s = Spec::parse("rr:slice_us=0").unwrap();
        let e = s.u64_in("slice_us", 1, 1, 10).unwrap_err();
        assert_eq!(
            e.to_string(),
            "policy rr: bad value 0 for slice_us: must be in 1..=10"
        );
    }

    /// Fuzz finding (config): a parameter name or value with a newline in it made a
    /// multi-line error (milk-vmm and milkctl print errors as one line).
    #[test]
    fn errors_quoting_user_text_stay_on_one_line() {
        let e = Spec::parse("rr\n:a\nb=1,a\nb=2").unwrap_err().to_string();
        assert_eq!(e, "policy rr\\n: parameter a\\nb given twice");
        let s = Spec::parse("rr:slice_us=1\n2").unwrap();
        let e = s.u64_in("slice_us", 1, 1, 10).unwrap_err().to_string();
        assert!(!e.contains('\n'), "{e:?}");
        assert!(e.contains("bad value 1\\n2 for slice_us"), "{e:?}");
    }
}
