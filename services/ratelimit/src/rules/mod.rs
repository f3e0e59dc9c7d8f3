//! The rule model (Envoy ratelimit's nested descriptors, plus mesh's
//! algorithm, burst and failure mode) and descriptor matching with Envoy's
//! semantics.
//!
//! - `parse`: YAML documents into [`Rules`], validated.
//! - `source`: reading a file or a directory of files, and hot reload.

mod parse;
mod source;

use std::{collections::HashMap, fmt, sync::Arc};

pub(crate) use parse::parse_documents;
pub(crate) use source::{Reload, RulesHandle, load_path, watch};

/// The period a limit counts over. Month and year are Envoy's fixed 30 and
/// 365 days.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Unit {
    Second,
    Minute,
    Hour,
    Day,
    Week,
    Month,
    Year,
}

impl Unit {
    pub(crate) fn parse(s: &str) -> Option<Self> {
        Some(match s.to_ascii_lowercase().as_str() {
            "second" => Self::Second,
            "minute" => Self::Minute,
            "hour" => Self::Hour,
            "day" => Self::Day,
            "week" => Self::Week,
            "month" => Self::Month,
            "year" => Self::Year,
            _ => return None,
        })
    }

    pub(crate) fn seconds(self) -> u64 {
        match self {
            Self::Second => 1,
            Self::Minute => 60,
            Self::Hour => 3600,
            Self::Day => 86_400,
            Self::Week => 7 * 86_400,
            Self::Month => 30 * 86_400,
            Self::Year => 365 * 86_400,
        }
    }
}

/// How hits are counted against a limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Algorithm {
    FixedWindow,
    SlidingWindow,
    TokenBucket,
}

impl Algorithm {
    pub(crate) fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "fixed_window" => Self::FixedWindow,
            "sliding_window" => Self::SlidingWindow,
            "token_bucket" => Self::TokenBucket,
            _ => return None,
        })
    }

    /// Short tag in Redis keys, so a rule that changes algorithm starts fresh
    /// instead of misreading another algorithm's state.
    pub(crate) fn tag(self) -> &'static str {
        match self {
            // "fw" held a hash {w, c, p}; "fc" is one integer (check.lua).
            Self::FixedWindow => "fc",
            Self::SlidingWindow => "sw",
            Self::TokenBucket => "tb",
        }
    }
}

/// Whether Envoy RLS answers of a domain carry RateLimit headers for the
/// client (`response_headers_to_add`): Envoy's `enable_x_ratelimit_headers`
/// and limitador's `--rate-limit-headers` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RateLimitHeaders {
    /// None (the default).
    #[default]
    None,
    /// `x-ratelimit-limit`, `x-ratelimit-remaining`, `x-ratelimit-reset` as
    /// draft-polli-ratelimit-headers-03 defines them.
    DraftVersion03,
}

impl RateLimitHeaders {
    /// `NONE` or `DRAFT_VERSION_03`, as Envoy and limitador spell them.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "NONE" => Some(Self::None),
            "DRAFT_VERSION_03" => Some(Self::DraftVersion03),
            _ => None,
        }
    }

    /// The name [`Self::parse`] reads.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "NONE",
            Self::DraftVersion03 => "DRAFT_VERSION_03",
        }
    }
}

/// What a domain does when Redis cannot answer in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum FailureMode {
    #[default]
    FailOpen,
    FailClosed,
}

impl FailureMode {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::FailOpen => "fail_open",
            Self::FailClosed => "fail_closed",
        }
    }
}

/// A configured limit.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Limit {
    pub(crate) requests_per_unit: u32,
    pub(crate) unit: Unit,
    pub(crate) algorithm: Algorithm,
    /// Bucket size for token_bucket (≥ 1); 0 otherwise.
    pub(crate) burst: u32,
}

/// What a matched rule node says about a descriptor.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Rule {
    /// The configured name, or the node's path (`route_chat.user_id`). Used
    /// as the metrics label: it comes from configuration, so it is bounded.
    pub(crate) name: Arc<str>,
    /// Whether `name` was given in the file (Envoy reports only given names).
    pub(crate) named: bool,
    /// `None` for unlimited rules.
    pub(crate) limit: Option<Limit>,
    pub(crate) shadow_mode: bool,
    pub(crate) replaces: Vec<String>,
}

/// A rule node: matches one descriptor entry.
#[derive(Debug, Clone)]
pub(crate) struct Node {
    pub(crate) key: String,
    /// `None` matches any value (one counter per distinct value).
    pub(crate) value: Option<String>,
    pub(crate) rule: Option<Arc<Rule>>,
    pub(crate) children: Level,
}

/// The nodes below one parent, indexed the way Envoy looks them up: exact
/// `key`+`value` first, then wildcard values in file order, then key only.
#[derive(Debug, Clone, Default)]
pub(crate) struct Level {
    pub(crate) nodes: Vec<Node>,
    exact: HashMap<(String, String), usize>,
    wildcards: Vec<(usize, Vec<String>)>,
    any_value: HashMap<String, usize>,
}

impl Level {
    /// Adds a node; `false` when the same key/value is already there.
    pub(crate) fn push(&mut self, node: Node) -> bool {
        let i = self.nodes.len();
        let fresh = match &node.value {
            None => self.any_value.insert(node.key.clone(), i).is_none(),
            Some(v) if v.contains('*') => {
                if self
                    .wildcards
                    .iter()
                    .any(|(j, _)| self.nodes[*j].key == node.key && self.nodes[*j].value == node.value)
                {
                    false
                } else {
                    self.wildcards.push((i, v.split('*').map(str::to_owned).collect()));
                    true
                }
            }
            Some(v) => self.exact.insert((node.key.clone(), v.clone()), i).is_none(),
        };
        if fresh {
            self.nodes.push(node);
        }
        fresh
    }

    fn find(&self, key: &str, value: &str) -> Option<&Node> {
        if let Some(i) = self.exact.get(&(key.to_owned(), value.to_owned())) {
            return Some(&self.nodes[*i]);
        }
        for (i, parts) in &self.wildcards {
            if self.nodes[*i].key == key && glob_match(parts, value) {
                return Some(&self.nodes[*i]);
            }
        }
        self.any_value.get(key).map(|i| &self.nodes[*i])
    }
}

/// `*` matches any run of characters (Envoy's wildcard values).
fn glob_match(parts: &[String], value: &str) -> bool {
    let (first, rest) = match parts.split_first() {
        Some(p) => p,
        None => return value.is_empty(),
    };
    let Some(mut remaining) = value.strip_prefix(first.as_str()) else { return false };
    let Some((last, middle)) = rest.split_last() else { return remaining.is_empty() };
    for part in middle {
        match remaining.find(part.as_str()) {
            Some(at) => remaining = &remaining[at + part.len()..],
            None => return false,
        }
    }
    remaining.len() >= last.len() && remaining.ends_with(last.as_str())
}

/// One domain's rules.
#[derive(Debug, Clone)]
pub(crate) struct DomainRules {
    pub(crate) name: String,
    pub(crate) failure_mode: FailureMode,
    /// `rate_limit_headers` (domain level); `None`: the service's default
    /// (`MESH_RATELIMIT_RATE_LIMIT_HEADERS`).
    pub(crate) rate_limit_headers: Option<RateLimitHeaders>,
    pub(crate) root: Level,
    /// The file the domain came from.
    pub(crate) source: String,
}

impl DomainRules {
    /// The rule for a descriptor's entries, as Envoy's ratelimit finds it:
    /// walk the tree entry by entry; the limit applies only when the node
    /// that carries it matched the descriptor's last entry.
    pub(crate) fn find<'a>(
        &self,
        entries: impl ExactSizeIterator<Item = (&'a str, &'a str)>,
    ) -> Option<&Arc<Rule>> {
        let last = entries.len().checked_sub(1)?;
        let mut level = &self.root;
        let mut found = None;
        for (i, (key, value)) in entries.enumerate() {
            let Some(node) = level.find(key, value) else { break };
            if i == last {
                found = node.rule.as_ref();
            }
            if node.children.nodes.is_empty() {
                break;
            }
            level = &node.children;
        }
        found
    }
}

/// Every loaded domain, and when and where from.
#[derive(Clone)]
pub(crate) struct Rules {
    pub(crate) domains: HashMap<String, Arc<DomainRules>>,
    pub(crate) loaded_at: std::time::SystemTime,
}

impl fmt::Debug for Rules {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut names: Vec<&String> = self.domains.keys().collect();
        names.sort();
        f.debug_struct("Rules").field("domains", &names).finish()
    }
}

impl Rules {
    pub(crate) fn empty() -> Self {
        Self { domains: HashMap::new(), loaded_at: std::time::SystemTime::now() }
    }

    pub(crate) fn domain(&self, name: &str) -> Option<&Arc<DomainRules>> {
        self.domains.get(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RULES: &str = r#"
domain: api
descriptors:
  - key: route
    value: chat
    descriptors:
      - key: user_id
        rate_limit: { unit: minute, requests_per_unit: 30, name: chat_per_user }
      - key: user_id
        value: vip
        rate_limit: { unlimited: true }
  - key: path
    value: /api/*/items*
    rate_limit: { unit: second, requests_per_unit: 5 }
  - key: path
    rate_limit: { unit: second, requests_per_unit: 50 }
  - key: endpoint
    rate_limit: { unit: minute, requests_per_unit: 1000, name: endpoint_global }
"#;

    fn domain() -> Arc<DomainRules> {
        let rules = parse_documents("t.yaml", RULES, &mut HashMap::new()).unwrap();
        rules.into_iter().next().unwrap()
    }

    fn find(d: &DomainRules, entries: &[(&str, &str)]) -> Option<String> {
        d.find(entries.iter().copied()).map(|r| r.name.to_string())
    }

    #[test]
    fn matches_like_envoy() {
        let d = domain();
        assert_eq!(find(&d, &[("route", "chat"), ("user_id", "42")]).as_deref(), Some("chat_per_user"));
        // More specific value wins over the any-value node.
        let vip = d.find([("route", "chat"), ("user_id", "vip")].into_iter()).unwrap();
        assert!(vip.limit.is_none());
        // The limit is only applied when the node matched the last entry.
        assert_eq!(find(&d, &[("route", "chat")]), None);
        assert_eq!(find(&d, &[("route", "chat"), ("user_id", "1"), ("extra", "x")]), None);
        assert_eq!(find(&d, &[("route", "search"), ("user_id", "1")]), None);
        // Wildcards before key-only defaults; names derived from the path.
        assert_eq!(find(&d, &[("path", "/api/v1/items/3")]).as_deref(), Some("path_/api/*/items*"));
        assert_eq!(find(&d, &[("path", "/other")]).as_deref(), Some("path"));
        assert_eq!(find(&d, &[("endpoint", "x")]).as_deref(), Some("endpoint_global"));
        assert_eq!(find(&d, &[("nothing", "x")]), None);
        assert_eq!(find(&d, &[]), None);
    }

    #[test]
    fn glob() {
        let p = |s: &str| s.split('*').map(str::to_owned).collect::<Vec<_>>();
        assert!(glob_match(&p("a*"), "abc"));
        assert!(glob_match(&p("a*"), "a"));
        assert!(!glob_match(&p("a*"), "ba"));
        assert!(glob_match(&p("*c"), "abc"));
        assert!(glob_match(&p("a*b*c"), "a-b-c"));
        assert!(!glob_match(&p("a*b*c"), "a-c"));
        assert!(!glob_match(&p("ab*ba"), "aba"));
        assert!(glob_match(&p("x"), "x"));
        assert!(!glob_match(&p("x"), "xy"));
    }
}
