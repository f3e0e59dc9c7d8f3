//! YAML → [`DomainRules`], validated. The format is Envoy ratelimit's, with
//! mesh's `failure_mode` and `rate_limit_headers` (domain level), `algorithm`
//! and `burst` (inside `rate_limit`). Unknown keys are errors, as in Envoy, so a typo never
//! silently drops a limit; Envoy's metrics-only keys are accepted and ignored.

use std::{collections::HashMap, sync::Arc};

use serde::{Deserialize, Deserializer};

use super::{Algorithm, DomainRules, FailureMode, Level, Limit, Node, RateLimitHeaders, Rule, Unit};

/// Why a rules file was refused (names the file, document and rule path).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub(crate) struct RulesError(pub(crate) String);

/// A YAML scalar as a string: Envoy's loader accepts `value: 42`.
fn scalar<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    use serde::de::Error;
    Ok(match serde_yaml_ng::Value::deserialize(d)? {
        serde_yaml_ng::Value::Null => None,
        serde_yaml_ng::Value::String(s) => Some(s),
        serde_yaml_ng::Value::Number(n) => Some(n.to_string()),
        serde_yaml_ng::Value::Bool(b) => Some(b.to_string()),
        _ => return Err(D::Error::custom("expected a string")),
    })
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct YamlDomain {
    #[serde(default, deserialize_with = "scalar")]
    domain: Option<String>,
    #[serde(default)]
    failure_mode: Option<String>,
    #[serde(default)]
    rate_limit_headers: Option<String>,
    #[serde(default)]
    descriptors: Vec<YamlDescriptor>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct YamlDescriptor {
    #[serde(default, deserialize_with = "scalar")]
    key: Option<String>,
    #[serde(default, deserialize_with = "scalar")]
    value: Option<String>,
    #[serde(default)]
    rate_limit: Option<YamlRateLimit>,
    #[serde(default)]
    shadow_mode: bool,
    /// mesh's GetRules shape puts `unlimited` on the node; Envoy's puts it in `rate_limit`.
    #[serde(default)]
    unlimited: bool,
    #[serde(default)]
    descriptors: Vec<YamlDescriptor>,
    // Envoy keys that only shape Envoy's own stats: accepted, ignored (mesh's
    // metrics are per rule name, never per descriptor value).
    #[serde(default)]
    #[allow(dead_code)]
    detailed_metric: Option<bool>,
    #[serde(default)]
    #[allow(dead_code)]
    value_to_metric: Option<bool>,
    #[serde(default)]
    #[allow(dead_code)]
    metadata: Option<serde_yaml_ng::Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct YamlRateLimit {
    #[serde(default)]
    unit: Option<String>,
    #[serde(default)]
    requests_per_unit: Option<u32>,
    #[serde(default, deserialize_with = "scalar")]
    name: Option<String>,
    #[serde(default)]
    unlimited: bool,
    #[serde(default)]
    replaces: Vec<YamlReplaces>,
    #[serde(default)]
    algorithm: Option<String>,
    #[serde(default)]
    burst: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum YamlReplaces {
    Named { name: String },
    Plain(String),
}

/// Parses every YAML document in `text` (documents separated by `---`; empty
/// ones are skipped). `seen` maps domains already loaded (from other files)
/// to their source, so a domain defined twice is refused.
pub(crate) fn parse_documents(
    source: &str,
    text: &str,
    seen: &mut HashMap<String, String>,
) -> Result<Vec<Arc<DomainRules>>, RulesError> {
    let mut out = Vec::new();
    for (i, doc) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let n = i + 1;
        let parsed: Option<YamlDomain> = Option::deserialize(doc).map_err(|e| {
            // serde_yaml's messages quote the offending YAML key, never a value.
            RulesError(format!("{source}: document {n}: {e}"))
        })?;
        let Some(parsed) = parsed else { continue };
        let domain = parsed.domain.clone().unwrap_or_default();
        if domain.is_empty() {
            return Err(RulesError(format!("{source}: document {n}: domain is missing or empty")));
        }
        let at = format!("{source}: document {n} (domain {domain:?})");
        if let Some(prev) = seen.get(&domain) {
            return Err(RulesError(format!("{at}: domain is already defined in {prev}")));
        }
        let failure_mode = match parsed.failure_mode.as_deref() {
            None | Some("fail_open") => FailureMode::FailOpen,
            Some("fail_closed") => FailureMode::FailClosed,
            Some(other) => {
                return Err(RulesError(format!(
                    "{at}: failure_mode {other:?} is not fail_open or fail_closed"
                )));
            }
        };
        let rate_limit_headers = match parsed.rate_limit_headers.as_deref() {
            None => None,
            Some(v) => Some(RateLimitHeaders::parse(v).ok_or_else(|| {
                RulesError(format!("{at}: rate_limit_headers {v:?} is not NONE or DRAFT_VERSION_03"))
            })?),
        };
        let root = level(&at, "", &parsed.descriptors)?;
        seen.insert(domain.clone(), source.to_owned());
        out.push(Arc::new(DomainRules {
            name: domain,
            failure_mode,
            rate_limit_headers,
            root,
            source: source.to_owned(),
        }));
    }
    Ok(out)
}

fn level(at: &str, parent: &str, descriptors: &[YamlDescriptor]) -> Result<Level, RulesError> {
    let mut out = Level::default();
    for d in descriptors {
        let key = d.key.clone().unwrap_or_default();
        if key.is_empty() {
            let within = if parent.is_empty() { "top level" } else { parent };
            return Err(RulesError(format!("{at}: a descriptor under {within} has an empty key")));
        }
        let value = d.value.clone().filter(|v| !v.is_empty());
        let segment = match &value {
            Some(v) => format!("{key}_{v}"),
            None => key.clone(),
        };
        let path = if parent.is_empty() { segment } else { format!("{parent}.{segment}") };
        let rule = rule(at, &path, d)?;
        let children = level(at, &path, &d.descriptors)?;
        if !out.push(Node { key, value, rule, children }) {
            return Err(RulesError(format!("{at}: descriptor {path} is defined twice")));
        }
    }
    Ok(out)
}

fn rule(at: &str, path: &str, d: &YamlDescriptor) -> Result<Option<Arc<Rule>>, RulesError> {
    let err = |m: String| RulesError(format!("{at}: {path}: {m}"));
    let Some(rl) = &d.rate_limit else {
        if d.unlimited {
            return Ok(Some(Arc::new(Rule {
                name: path.into(),
                named: false,
                limit: None,
                shadow_mode: d.shadow_mode,
                replaces: Vec::new(),
            })));
        }
        if d.shadow_mode {
            return Err(err("shadow_mode without a rate_limit".into()));
        }
        return Ok(None);
    };
    let given = rl.name.clone().filter(|n| !n.is_empty());
    let name: Arc<str> = given.clone().unwrap_or_else(|| path.to_owned()).into();
    let replaces: Vec<String> = rl
        .replaces
        .iter()
        .map(|r| match r {
            YamlReplaces::Named { name } | YamlReplaces::Plain(name) => name.clone(),
        })
        .collect();
    if replaces.iter().any(String::is_empty) {
        return Err(err("replaces has an empty name".into()));
    }
    if given.as_ref().is_some_and(|n| replaces.contains(n)) {
        return Err(err("replaces names the rule itself".into()));
    }
    let unit = rl.unit.as_deref().map(|u| Unit::parse(u).ok_or_else(|| err(format!("invalid unit {u:?}"))));
    let unlimited = rl.unlimited || d.unlimited;
    let limit = if unlimited {
        if unit.is_some() {
            return Err(err("an unlimited rate_limit must not have a unit".into()));
        }
        None
    } else {
        let unit =
            unit.ok_or_else(|| err("rate_limit needs a unit (second, minute, hour, day)".into()))??;
        let requests_per_unit =
            rl.requests_per_unit.ok_or_else(|| err("rate_limit needs requests_per_unit".into()))?;
        let algorithm = match rl.algorithm.as_deref() {
            None => Algorithm::SlidingWindow,
            Some(a) => Algorithm::parse(a).ok_or_else(|| {
                err(format!("algorithm {a:?} is not fixed_window, sliding_window or token_bucket"))
            })?,
        };
        let burst = match (algorithm, rl.burst) {
            (Algorithm::TokenBucket, _) if requests_per_unit == 0 => {
                return Err(err("a token_bucket needs requests_per_unit of at least 1".into()));
            }
            (Algorithm::TokenBucket, Some(0)) => return Err(err("burst must be at least 1".into())),
            (Algorithm::TokenBucket, Some(b)) => b,
            // A bucket of one unit's worth: the window algorithms' capacity.
            (Algorithm::TokenBucket, None) => requests_per_unit,
            (_, Some(_)) => return Err(err("burst applies to algorithm token_bucket only".into())),
            (_, None) => 0,
        };
        Some(Limit { requests_per_unit, unit, algorithm, burst })
    };
    Ok(Some(Arc::new(Rule { name, named: given.is_some(), limit, shadow_mode: d.shadow_mode, replaces })))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Vec<Arc<DomainRules>>, RulesError> {
        parse_documents("rules.yaml", text, &mut HashMap::new())
    }

    #[test]
    fn the_local_rules_express_the_required_limits() {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../deploy/local/ratelimit.yaml"
        ))
        .unwrap();
        let domains = parse(&text).unwrap();
        let api = domains.iter().find(|d| d.name == "api").unwrap();
        let limit = |entries: &[(&str, &str)]| {
            let r = api.find(entries.iter().copied()).unwrap();
            let l = r.limit.clone().unwrap();
            (l.requests_per_unit, l.unit)
        };
        assert_eq!(limit(&[("route", "chat"), ("user_id", "1")]), (30, Unit::Minute));
        assert_eq!(limit(&[("route", "search"), ("user_id", "1")]), (100, Unit::Minute));
        assert_eq!(limit(&[("route", "embeddings"), ("user_id", "1")]), (10, Unit::Minute));
        assert_eq!(limit(&[("job", "video_render"), ("user_id", "1")]), (3, Unit::Hour));
        assert_eq!(limit(&[("job", "model_finetune"), ("user_id", "1")]), (2, Unit::Hour));
        assert_eq!(limit(&[("endpoint", "/v1/chat")]), (1000, Unit::Minute));
        assert!(domains.iter().any(|d| d.name == "session" && d.failure_mode == FailureMode::FailClosed));
        // The data service's domain: per user and per user and collection,
        // each taking a whole Batch (500 operations) at once.
        let data = domains.iter().find(|d| d.name == "data").unwrap();
        assert_eq!(data.failure_mode, FailureMode::FailOpen);
        for entries in [&[("user_id", "1")][..], &[("user_id", "1"), ("collection", "any")][..]] {
            let l = data.find(entries.iter().copied()).unwrap().limit.clone().unwrap();
            assert!(l.requests_per_unit.max(l.burst) >= 500, "{entries:?}: {l:?}");
        }
    }

    #[test]
    fn extensions_and_defaults() {
        let d = parse(
            r#"
domain: x
failure_mode: fail_closed
descriptors:
  - key: a
    rate_limit: { unit: Second, requests_per_unit: 5, algorithm: token_bucket, burst: 10 }
  - key: b
    rate_limit: { unit: hour, requests_per_unit: 3 }
  - key: c
    rate_limit: { unit: hour, requests_per_unit: 3, algorithm: token_bucket }
  - key: d
    shadow_mode: true
    rate_limit: { unit: day, requests_per_unit: 1, name: dd, replaces: [{ name: other }] }
"#,
        )
        .unwrap();
        let d = &d[0];
        assert_eq!(d.failure_mode, FailureMode::FailClosed);
        let get = |k: &str| d.find([(k, "v")].into_iter()).unwrap().clone();
        let a = get("a").limit.clone().unwrap();
        assert_eq!((a.algorithm, a.burst, a.unit), (Algorithm::TokenBucket, 10, Unit::Second));
        assert_eq!(get("b").limit.clone().unwrap().algorithm, Algorithm::SlidingWindow);
        assert_eq!(get("c").limit.clone().unwrap().burst, 3);
        let dd = get("d");
        assert!(dd.shadow_mode && dd.named);
        assert_eq!(dd.replaces, vec!["other".to_owned()]);
    }

    #[test]
    fn several_documents_and_empty_ones() {
        let d = parse("domain: a\ndescriptors: []\n---\n---\ndomain: b\n").unwrap();
        assert_eq!(d.iter().map(|d| d.name.as_str()).collect::<Vec<_>>(), ["a", "b"]);
    }

    #[test]
    fn bad_files_say_why() {
        let cases = [
            ("descriptors: []", "domain is missing"),
            ("domain: a\nfailure_mode: maybe", "failure_mode"),
            ("domain: a\nrate_limit_headers: draft", "rate_limit_headers"),
            (
                "domain: a\ndescriptors:\n  - key: k\n    rate_limit: { unit: minutes, requests_per_unit: 1 }",
                "invalid unit \"minutes\"",
            ),
            ("domain: a\ndescriptors:\n  - key: k\n    rate_limit: { unit: minute }", "requests_per_unit"),
            (
                "domain: a\ndescriptors:\n  - key: k\n    rate_limit: { unit: minute, requests_per_unit: 1, burst: 3 }",
                "burst applies",
            ),
            (
                "domain: a\ndescriptors:\n  - key: k\n    rate_limit: { unit: minute, requests_per_unit: 1, algorithm: leaky }",
                "algorithm",
            ),
            (
                "domain: a\ndescriptors:\n  - key: k\n    rate_limit: { unit: minute, requests_per_unit: 1, unlimited: true }",
                "must not have a unit",
            ),
            ("domain: a\ndescriptors:\n  - key: k\n  - key: k", "defined twice"),
            ("domain: a\ndescriptors:\n  - value: v", "empty key"),
            (
                "domain: a\ndescriptors:\n  - key: k\n    rate_limit: { unit: minute, requests_per_unit: 1, nmae: x }",
                "unknown field `nmae`",
            ),
            ("domain: a\n---\ndomain: a", "already defined"),
            ("domain: a\ndescriptors: [", "document 1"),
        ];
        for (text, want) in cases {
            let e = parse(text).unwrap_err();
            assert!(e.0.contains(want), "{text:?}: {e} does not contain {want:?}");
            assert!(e.0.starts_with("rules.yaml"), "{e}");
        }
    }
}
