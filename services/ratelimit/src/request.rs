//! Requests validated once at the boundary into domain types: both APIs
//! (mesh's `Check` and Envoy's `ShouldRateLimit`) become a [`CheckCall`].

use crate::{
    error::Error,
    rules::{Algorithm, Limit, Unit},
};

/// At most this many descriptors per call.
pub(crate) const MAX_DESCRIPTORS: usize = 64;
/// At most this many entries per descriptor.
pub(crate) const MAX_ENTRIES: usize = 32;
/// Longest domain, key (bytes).
pub(crate) const MAX_NAME_LEN: usize = 256;
/// Longest entry value (bytes).
pub(crate) const MAX_VALUE_LEN: usize = 1024;
/// Largest hits_addend: more than any sane limit, far below overflow.
pub(crate) const MAX_HITS: u64 = 1_000_000;

/// One descriptor of a call.
#[derive(Debug, Clone)]
pub(crate) struct Descriptor {
    pub(crate) entries: Vec<(String, String)>,
    /// Hits to consume (0: check only).
    pub(crate) hits: u32,
    /// Envoy's per-descriptor limit override.
    pub(crate) limit_override: Option<Limit>,
}

/// A validated Check.
#[derive(Debug, Clone)]
pub(crate) struct CheckCall {
    pub(crate) domain: String,
    pub(crate) descriptors: Vec<Descriptor>,
}

/// Collects violations while validating.
#[derive(Debug, Default)]
pub(crate) struct Violations(Vec<(String, String)>);

impl Violations {
    fn add(&mut self, field: impl Into<String>, description: impl Into<String>) {
        self.0.push((field.into(), description.into()));
    }

    fn finish<T>(self, value: T) -> Result<T, Error> {
        if self.0.is_empty() { Ok(value) } else { Err(Error::InvalidArgument(self.0)) }
    }
}

pub(crate) fn domain(v: &mut Violations, field: &str, domain: &str) {
    if domain.is_empty() {
        v.add(field, "must not be empty");
    } else if domain.len() > MAX_NAME_LEN {
        v.add(field, format!("must be at most {MAX_NAME_LEN} bytes"));
    }
}

fn hits(v: &mut Violations, field: &str, hits: u64) -> u32 {
    if hits > MAX_HITS {
        v.add(field, format!("must be at most {MAX_HITS}"));
        return 0;
    }
    hits as u32
}

fn entries<'a>(
    v: &mut Violations,
    field: &str,
    entries: impl ExactSizeIterator<Item = (&'a str, &'a str)>,
) -> Vec<(String, String)> {
    if entries.len() == 0 {
        v.add(format!("{field}.entries"), "a descriptor needs at least one entry");
    } else if entries.len() > MAX_ENTRIES {
        v.add(format!("{field}.entries"), format!("must have at most {MAX_ENTRIES} entries"));
    }
    entries
        .enumerate()
        .map(|(j, (key, value))| {
            if key.is_empty() {
                v.add(format!("{field}.entries[{j}].key"), "must not be empty");
            } else if key.len() > MAX_NAME_LEN {
                v.add(format!("{field}.entries[{j}].key"), format!("must be at most {MAX_NAME_LEN} bytes"));
            }
            if value.len() > MAX_VALUE_LEN {
                v.add(
                    format!("{field}.entries[{j}].value"),
                    format!("must be at most {MAX_VALUE_LEN} bytes"),
                );
            }
            (key.to_owned(), value.to_owned())
        })
        .collect()
}

fn count(v: &mut Violations, n: usize) {
    if n == 0 {
        v.add("descriptors", "at least one descriptor is required");
    } else if n > MAX_DESCRIPTORS {
        v.add("descriptors", format!("at most {MAX_DESCRIPTORS} descriptors per call, got {n}"));
    }
}

/// Request-level hits: 0 means 1.
fn request_hits(v: &mut Violations, h: u32) -> u32 {
    if h == 0 { 1 } else { hits(v, "hits_addend", u64::from(h)) }
}

impl CheckCall {
    pub(crate) fn from_mesh(r: mesh_proto::ratelimit::CheckRequest) -> Result<Self, Error> {
        let mut v = Violations::default();
        domain(&mut v, "domain", &r.domain);
        count(&mut v, r.descriptors.len());
        let default_hits = request_hits(&mut v, r.hits_addend);
        let descriptors = r
            .descriptors
            .iter()
            .take(MAX_DESCRIPTORS)
            .enumerate()
            .map(|(i, d)| {
                let field = format!("descriptors[{i}]");
                Descriptor {
                    entries: entries(
                        &mut v,
                        &field,
                        d.entries.iter().map(|e| (e.key.as_str(), e.value.as_str())),
                    ),
                    hits: match d.hits_addend {
                        Some(h) => hits(&mut v, &format!("{field}.hits_addend"), u64::from(h)),
                        None => default_hits,
                    },
                    limit_override: None,
                }
            })
            .collect();
        v.finish(Self { domain: r.domain, descriptors })
    }

    pub(crate) fn from_envoy(r: mesh_proto::envoy_rls::RateLimitRequest) -> Result<Self, Error> {
        use mesh_proto::envoy::r#type::v3::RateLimitUnit;
        let mut v = Violations::default();
        domain(&mut v, "domain", &r.domain);
        count(&mut v, r.descriptors.len());
        let default_hits = request_hits(&mut v, r.hits_addend);
        let descriptors = r
            .descriptors
            .iter()
            .take(MAX_DESCRIPTORS)
            .enumerate()
            .map(|(i, d)| {
                let field = format!("descriptors[{i}]");
                let limit_override = d.limit.as_ref().and_then(|l| {
                    let unit = match RateLimitUnit::try_from(l.unit) {
                        Ok(RateLimitUnit::Second) => Unit::Second,
                        Ok(RateLimitUnit::Minute) => Unit::Minute,
                        Ok(RateLimitUnit::Hour) => Unit::Hour,
                        Ok(RateLimitUnit::Day) => Unit::Day,
                        Ok(RateLimitUnit::Month) => Unit::Month,
                        Ok(RateLimitUnit::Year) => Unit::Year,
                        _ => {
                            v.add(format!("{field}.limit.unit"), "must be a known unit");
                            return None;
                        }
                    };
                    // Envoy's ratelimit counts overrides in fixed windows; mesh
                    // uses its default algorithm, which never allows 2× at a boundary.
                    Some(Limit {
                        requests_per_unit: l.requests_per_unit,
                        unit,
                        algorithm: Algorithm::SlidingWindow,
                        burst: 0,
                    })
                });
                Descriptor {
                    entries: entries(
                        &mut v,
                        &field,
                        d.entries.iter().map(|e| (e.key.as_str(), e.value.as_str())),
                    ),
                    hits: match &d.hits_addend {
                        Some(h) => hits(&mut v, &format!("{field}.hits_addend"), *h),
                        None => default_hits,
                    },
                    limit_override,
                }
            })
            .collect();
        v.finish(Self { domain: r.domain, descriptors })
    }
}

/// Validates Reset's input.
pub(crate) fn reset(
    r: mesh_proto::ratelimit::ResetRequest,
) -> Result<(String, Vec<(String, String)>), Error> {
    let mut v = Violations::default();
    domain(&mut v, "domain", &r.domain);
    let entries = match &r.descriptor {
        Some(d) => {
            entries(&mut v, "descriptor", d.entries.iter().map(|e| (e.key.as_str(), e.value.as_str())))
        }
        None => {
            v.add("descriptor", "is required");
            Vec::new()
        }
    };
    v.finish((r.domain, entries))
}

/// Validates GetRules' input.
pub(crate) fn get_rules(r: &mesh_proto::ratelimit::GetRulesRequest) -> Result<(), Error> {
    let mut v = Violations::default();
    domain(&mut v, "domain", &r.domain);
    v.finish(())
}

#[cfg(test)]
mod tests {
    use mesh_proto::ratelimit::{CheckRequest, Descriptor as PDescriptor, Entry};

    use super::*;

    fn desc(entries: &[(&str, &str)], hits: Option<u32>) -> PDescriptor {
        PDescriptor {
            entries: entries.iter().map(|(k, v)| Entry { key: (*k).into(), value: (*v).into() }).collect(),
            hits_addend: hits,
        }
    }

    fn fields(e: Error) -> Vec<String> {
        match e {
            Error::InvalidArgument(v) => v.into_iter().map(|(f, _)| f).collect(),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn hits_addend_semantics() {
        let c = CheckCall::from_mesh(CheckRequest {
            domain: "d".into(),
            descriptors: vec![
                desc(&[("k", "v")], None),
                desc(&[("k", "v")], Some(0)),
                desc(&[("k", "v")], Some(5)),
            ],
            hits_addend: 0,
        })
        .unwrap();
        assert_eq!(c.descriptors.iter().map(|d| d.hits).collect::<Vec<_>>(), [1, 0, 5]);
        let c = CheckCall::from_mesh(CheckRequest {
            domain: "d".into(),
            descriptors: vec![desc(&[("k", "v")], None)],
            hits_addend: 3,
        })
        .unwrap();
        assert_eq!(c.descriptors[0].hits, 3);
    }

    #[test]
    fn bad_input_names_every_field() {
        let e = CheckCall::from_mesh(CheckRequest {
            domain: String::new(),
            descriptors: vec![desc(&[], None), desc(&[("", "v")], Some(2_000_000))],
            hits_addend: 0,
        })
        .unwrap_err();
        assert_eq!(
            fields(e),
            [
                "domain",
                "descriptors[0].entries",
                "descriptors[1].entries[0].key",
                "descriptors[1].hits_addend"
            ]
        );
        let many = (0..65).map(|_| desc(&[("k", "v")], None)).collect();
        let e = CheckCall::from_mesh(CheckRequest { domain: "d".into(), descriptors: many, hits_addend: 0 })
            .unwrap_err();
        assert_eq!(fields(e), ["descriptors"]);
        let e =
            CheckCall::from_mesh(CheckRequest { domain: "d".into(), descriptors: vec![], hits_addend: 0 })
                .unwrap_err();
        assert_eq!(fields(e), ["descriptors"]);
    }
}
