//! Requests parsed once, at the boundary, into the types the rest of the
//! service trusts: [`NewEvent`], [`Filter`], [`PageToken`], [`SequenceRange`].
//!
//! Every string that reaches PostgreSQL is free of NUL characters (neither
//! `text` nor `jsonb` can hold them), every number in metadata is finite
//! (JSON has no NaN) and otherwise kept bit for bit, and timestamps are in
//! range and cut to microseconds (what `timestamptz` keeps, and so what the
//! hash covers).

use std::{net::IpAddr, time::Duration};

use base64::Engine as _;
use chrono::{DateTime, Utc};
use mesh_proto::audit as pb;
use prost::Message as _;
use prost_types::{Struct, value::Kind};
use sha2::{Digest, Sha256};
use tonic_types::FieldViolation;
use uuid::Uuid;

use crate::{
    chain::{Event, GENESIS, HashVersion, Outcome},
    error::Error,
};

/// Largest encoded `metadata` accepted.
pub const MAX_METADATA_BYTES: usize = 64 * 1024;
/// Deepest nesting of objects and lists in `metadata`, the object itself
/// being depth 1. Each level costs three protobuf messages of the decoder's
/// limit of 100, so about this deep is what an AppendRequest can carry at
/// all; a QueryResponse wraps an event no deeper, so whatever is appended
/// can be read back.
pub const MAX_METADATA_DEPTH: usize = 32;
/// Largest idempotency key, request id, actor/resource type, action.
const MAX_SHORT: usize = 256;
/// Largest actor id, resource id, user agent.
const MAX_LONG: usize = 1024;
/// Default and largest Query page.
pub const DEFAULT_PAGE_SIZE: usize = 100;
/// Largest Query page.
pub const MAX_PAGE_SIZE: usize = 1000;

/// A validated event to append: what the caller says, before the service
/// gives it an id, a sequence, `recorded_at` and its hashes.
#[derive(Debug, Clone, PartialEq)]
pub struct NewEvent {
    /// When it happened; `None`: when it is recorded.
    pub occurred_at: Option<DateTime<Utc>>,
    /// Actor kind.
    pub actor_type: String,
    /// Actor id (non-empty).
    pub actor_id: String,
    /// Action (non-empty).
    pub action: String,
    /// Resource kind.
    pub resource_type: String,
    /// Resource id.
    pub resource_id: String,
    /// Outcome.
    pub outcome: Outcome,
    /// Client IP in canonical text form, or empty.
    pub source_ip: String,
    /// Client User-Agent.
    pub source_user_agent: String,
    /// Recording service (the idempotency scope).
    pub source_service: String,
    /// Request id.
    pub request_id: String,
    /// Trace id: 32 lowercase hex digits, or empty.
    pub trace_id: String,
    /// Metadata, exactly as sent (nulls spelled `NULL_VALUE`).
    pub metadata: Struct,
}

impl NewEvent {
    /// The stored event at `sequence`, not yet sealed into the chain.
    pub fn into_event(self, id: Uuid, sequence: u64, recorded_at: DateTime<Utc>) -> Event {
        Event {
            version: HashVersion::CURRENT,
            sequence,
            id,
            occurred_at: self.occurred_at.unwrap_or(recorded_at),
            recorded_at,
            actor_type: self.actor_type,
            actor_id: self.actor_id,
            action: self.action,
            resource_type: self.resource_type,
            resource_id: self.resource_id,
            outcome: self.outcome,
            source_ip: self.source_ip,
            source_user_agent: self.source_user_agent,
            source_service: self.source_service,
            request_id: self.request_id,
            trace_id: self.trace_id,
            metadata: self.metadata,
            prev_hash: GENESIS,
            hash: GENESIS,
        }
    }
}

/// A validated Append.
#[derive(Debug, Clone, PartialEq)]
pub struct AppendCommand {
    /// The event.
    pub event: NewEvent,
    /// Deduplication key within `event.source_service`.
    pub idempotency_key: Option<String>,
    /// What the caller sent, for telling a resend from another event under
    /// the same key ([`fingerprint`]).
    pub fingerprint: [u8; 32],
}

/// SHA-256 over the event as the caller sent it (after validation, before
/// the service fills `occurred_at`, `request_id` or `trace_id` in): every
/// field but `source.service` (the key's scope), each length-prefixed, the
/// metadata as its protobuf encoding (maps in key order). A resend of the
/// same request has the same fingerprint even if it arrives with another
/// `x-request-id` or at another time.
pub fn fingerprint(e: &NewEvent) -> [u8; 32] {
    let mut h = Sha256::new();
    let mut field = |b: &[u8]| {
        h.update((b.len() as u64).to_be_bytes());
        h.update(b);
    };
    field(b"mesh-audit append v1");
    match e.occurred_at {
        None => field(b""),
        Some(t) => field(
            &[t.timestamp().to_be_bytes(), i64::from(t.timestamp_subsec_nanos()).to_be_bytes()].concat(),
        ),
    }
    for s in [&e.actor_type, &e.actor_id, &e.action, &e.resource_type, &e.resource_id] {
        field(s.as_bytes());
    }
    field(&[e.outcome.code()]);
    for s in [&e.source_ip, &e.source_user_agent, &e.request_id, &e.trace_id] {
        field(s.as_bytes());
    }
    field(&e.metadata.encode_to_vec());
    h.finalize().into()
}

/// What the call itself says about where it came from, used when the event
/// leaves `request_id` or `trace_id` empty.
#[derive(Debug, Clone, Default)]
pub struct CallContext {
    /// The call's `x-request-id`.
    pub request_id: Option<String>,
    /// The trace id of the call's `traceparent`.
    pub trace_id: Option<String>,
}

/// The trace id of a W3C `traceparent` header value, if it is well formed.
pub fn trace_id_of_traceparent(v: &str) -> Option<String> {
    let mut parts = v.split('-');
    let (version, trace, span, _flags) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    (version.len() == 2 && span.len() == 16).then_some(())?;
    normalize_trace_id(trace)
}

fn normalize_trace_id(s: &str) -> Option<String> {
    let ok = s.len() == 32 && s.bytes().all(|b| b.is_ascii_hexdigit()) && s.bytes().any(|b| b != b'0');
    ok.then(|| s.to_ascii_lowercase())
}

/// Collects field violations while a request is parsed.
#[derive(Debug, Default)]
struct Violations(Vec<FieldViolation>);

impl Violations {
    fn add(&mut self, field: &str, description: impl Into<String>) {
        self.0.push(FieldViolation::new(field, description));
    }

    /// A bounded, NUL-free string.
    fn text(&mut self, field: &str, value: String, max: usize, required: bool) -> String {
        if required && value.trim().is_empty() {
            self.add(field, "must not be empty");
        } else if value.len() > max {
            self.add(field, format!("must be at most {max} bytes"));
        } else if value.contains('\0') {
            self.add(field, "must not contain NUL characters");
        }
        value
    }

    fn finish<T>(self, value: T) -> Result<T, Error> {
        if self.0.is_empty() { Ok(value) } else { Err(Error::InvalidArgument(self.0)) }
    }
}

/// A protobuf timestamp as a `DateTime`, cut to microseconds; `None` if it
/// is out of the range protobuf allows (years 1 to 9999) or malformed.
pub fn timestamp(ts: &prost_types::Timestamp) -> Option<DateTime<Utc>> {
    const MIN: i64 = -62_135_596_800; // 0001-01-01T00:00:00Z
    const MAX: i64 = 253_402_300_799; // 9999-12-31T23:59:59Z
    if !(MIN..=MAX).contains(&ts.seconds) || !(0..1_000_000_000).contains(&ts.nanos) {
        return None;
    }
    DateTime::from_timestamp(ts.seconds, (ts.nanos / 1000) as u32 * 1000)
}

/// A `DateTime` as a protobuf timestamp.
pub fn to_timestamp(t: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp { seconds: t.timestamp(), nanos: t.timestamp_subsec_nanos() as i32 }
}

/// Parses an Append at time `now`.
pub fn parse_append(
    req: pb::AppendRequest,
    now: DateTime<Utc>,
    max_future_skew: Duration,
    call: &CallContext,
) -> Result<AppendCommand, Error> {
    let mut v = Violations::default();
    let Some(e) = req.event else {
        return Err(Error::field("event", "is required"));
    };
    let occurred_at = match &e.occurred_at {
        None => None,
        Some(ts) => match timestamp(ts) {
            None => {
                v.add("event.occurred_at", "must be a valid timestamp between years 1 and 9999");
                None
            }
            Some(t) if t > now + max_future_skew => {
                v.add(
                    "event.occurred_at",
                    format!("must not be more than {}s in the future", max_future_skew.as_secs()),
                );
                None
            }
            Some(t) => Some(t),
        },
    };
    let (actor_type, actor_id) = match e.actor {
        None => {
            v.add("event.actor", "is required");
            (String::new(), String::new())
        }
        Some(a) => (
            v.text("event.actor.type", a.r#type, MAX_SHORT, false),
            v.text("event.actor.id", a.id, MAX_LONG, true),
        ),
    };
    let action = v.text("event.action", e.action, MAX_SHORT, true);
    let resource = e.resource.unwrap_or_default();
    let resource_type = v.text("event.resource.type", resource.r#type, MAX_SHORT, false);
    let resource_id = v.text("event.resource.id", resource.id, MAX_LONG, false);
    let outcome = match pb::Outcome::try_from(e.outcome) {
        Ok(pb::Outcome::Success) => Outcome::Success,
        Ok(pb::Outcome::Failure) => Outcome::Failure,
        Ok(pb::Outcome::Denied) => Outcome::Denied,
        Ok(pb::Outcome::Unspecified) | Err(_) => {
            v.add("event.outcome", "must be OUTCOME_SUCCESS, OUTCOME_FAILURE or OUTCOME_DENIED");
            Outcome::Success
        }
    };
    let source = e.source.unwrap_or_default();
    let source_ip = match source.ip.trim() {
        "" => String::new(),
        ip => match ip.parse::<IpAddr>() {
            Ok(ip) => ip.to_string(),
            Err(_) => {
                v.add("event.source.ip", "must be an IPv4 or IPv6 address");
                String::new()
            }
        },
    };
    let source_user_agent = v.text("event.source.user_agent", source.user_agent, MAX_LONG, false);
    let source_service = v.text("event.source.service", source.service, MAX_SHORT, false);
    let sent_request_id = v.text("event.request_id", e.request_id, MAX_SHORT, false);
    let sent_trace_id = match e.trace_id.as_str() {
        "" => String::new(),
        t => normalize_trace_id(t).unwrap_or_else(|| {
            v.add("event.trace_id", "must be 32 hexadecimal digits, not all zero");
            String::new()
        }),
    };
    let metadata = match e.metadata {
        None => Struct::default(),
        Some(s) if s.encoded_len() > MAX_METADATA_BYTES => {
            v.add("event.metadata", format!("must be at most {MAX_METADATA_BYTES} bytes encoded"));
            Struct::default()
        }
        Some(mut s) => match mesh_proto::json::check("event.metadata", &s, MAX_METADATA_DEPTH) {
            Ok(()) => {
                spell_nulls(&mut s);
                s
            }
            Err(bad) => {
                v.add(&bad.path, bad.reason);
                Struct::default()
            }
        },
    };
    let idempotency_key = match v.text("idempotency_key", req.idempotency_key, MAX_SHORT, false) {
        k if k.is_empty() => None,
        k => Some(k),
    };
    let mut event = NewEvent {
        occurred_at,
        actor_type,
        actor_id,
        action,
        resource_type,
        resource_id,
        outcome,
        source_ip,
        source_user_agent,
        source_service,
        request_id: sent_request_id,
        trace_id: sent_trace_id,
        metadata,
    };
    let fingerprint = fingerprint(&event);
    if event.request_id.is_empty() {
        event.request_id = call.request_id.clone().unwrap_or_default();
    }
    if event.trace_id.is_empty() {
        event.trace_id = call.trace_id.clone().unwrap_or_default();
    }
    v.finish(AppendCommand { event, idempotency_key, fingerprint })
}

/// Spells every null `NULL_VALUE` (a Value without a kind, or with an
/// unknown enum number, is null too): one spelling per value, so what is
/// stored is a function of what is hashed.
fn spell_nulls(s: &mut Struct) {
    fn value(v: &mut prost_types::Value) {
        match &mut v.kind {
            None | Some(Kind::NullValue(_)) => v.kind = Some(Kind::NullValue(0)),
            Some(Kind::StructValue(s)) => spell_nulls(s),
            Some(Kind::ListValue(l)) => l.values.iter_mut().for_each(value),
            Some(_) => {}
        }
    }
    s.fields.values_mut().for_each(value);
}

/// A stored event as the API returns it.
pub fn event_to_proto(e: &Event) -> pb::AuditEvent {
    pb::AuditEvent {
        id: e.id.to_string(),
        sequence: e.sequence,
        occurred_at: Some(to_timestamp(e.occurred_at)),
        recorded_at: Some(to_timestamp(e.recorded_at)),
        actor: Some(pb::Actor { r#type: e.actor_type.clone(), id: e.actor_id.clone() }),
        action: e.action.clone(),
        resource: Some(pb::Resource { r#type: e.resource_type.clone(), id: e.resource_id.clone() }),
        outcome: match e.outcome {
            Outcome::Success => pb::Outcome::Success,
            Outcome::Failure => pb::Outcome::Failure,
            Outcome::Denied => pb::Outcome::Denied,
        } as i32,
        source: Some(pb::Source {
            ip: e.source_ip.clone(),
            user_agent: e.source_user_agent.clone(),
            service: e.source_service.clone(),
        }),
        request_id: e.request_id.clone(),
        trace_id: e.trace_id.clone(),
        metadata: Some(e.metadata.clone()),
        prev_hash: e.prev_hash.to_vec(),
        hash: e.hash.to_vec(),
        hash_version: e.version.code().unsigned_abs().into(),
    }
}

/// Which events a Query, Tail or Export wants. `None` matches anything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    /// Actor id.
    pub actor_id: Option<String>,
    /// Action.
    pub action: Option<String>,
    /// Resource kind.
    pub resource_type: Option<String>,
    /// Resource id.
    pub resource_id: Option<String>,
    /// Outcome.
    pub outcome: Option<Outcome>,
    /// `occurred_at >= since`.
    pub since: Option<DateTime<Utc>>,
    /// `occurred_at < until`.
    pub until: Option<DateTime<Utc>>,
}

impl Filter {
    /// Whether `e` passes: the same test the SQL built in `store` makes.
    pub fn matches(&self, e: &Event) -> bool {
        fn eq(want: &Option<String>, got: &str) -> bool {
            want.as_deref().is_none_or(|w| w == got)
        }
        eq(&self.actor_id, &e.actor_id)
            && eq(&self.action, &e.action)
            && eq(&self.resource_type, &e.resource_type)
            && eq(&self.resource_id, &e.resource_id)
            && self.outcome.is_none_or(|o| o == e.outcome)
            && self.since.is_none_or(|t| e.occurred_at >= t)
            && self.until.is_none_or(|t| e.occurred_at < t)
    }

    /// A short digest of the filter, bound into page tokens so a token is
    /// only accepted with the filter it was made for.
    fn fingerprint(&self) -> [u8; 8] {
        let mut h = Sha256::new();
        for s in [&self.actor_id, &self.action, &self.resource_type, &self.resource_id] {
            match s {
                None => h.update([0]),
                Some(s) => {
                    h.update([1]);
                    h.update((s.len() as u64).to_be_bytes());
                    h.update(s.as_bytes());
                }
            }
        }
        h.update([self.outcome.map_or(0, Outcome::code)]);
        for t in [self.since, self.until] {
            h.update(t.map_or(i64::MIN, |t| t.timestamp_micros()).to_be_bytes());
        }
        let d = h.finalize();
        d[..8].try_into().expect("8 bytes")
    }
}

/// Parses an `EventFilter` (absent: everything); `prefix` names it in violations.
pub fn parse_filter(f: Option<pb::EventFilter>, prefix: &str) -> Result<Filter, Error> {
    let mut v = Violations::default();
    let f = f.unwrap_or_default();
    let mut opt = |name: &str, s: String, max: usize| {
        let s = v.text(&format!("{prefix}.{name}"), s, max, false);
        (!s.is_empty()).then_some(s)
    };
    let actor_id = opt("actor_id", f.actor_id, MAX_LONG);
    let action = opt("action", f.action, MAX_SHORT);
    let resource_type = opt("resource_type", f.resource_type, MAX_SHORT);
    let resource_id = opt("resource_id", f.resource_id, MAX_LONG);
    let outcome = match pb::Outcome::try_from(f.outcome) {
        Ok(pb::Outcome::Unspecified) => None,
        Ok(pb::Outcome::Success) => Some(Outcome::Success),
        Ok(pb::Outcome::Failure) => Some(Outcome::Failure),
        Ok(pb::Outcome::Denied) => Some(Outcome::Denied),
        Err(_) => {
            v.add(&format!("{prefix}.outcome"), "is not a known outcome");
            None
        }
    };
    let mut time = |name: &str, ts: Option<prost_types::Timestamp>| {
        ts.and_then(|ts| {
            let t = timestamp(&ts);
            if t.is_none() {
                v.add(&format!("{prefix}.{name}"), "must be a valid timestamp between years 1 and 9999");
            }
            t
        })
    };
    let since = time("since", f.since);
    let until = time("until", f.until);
    if let (Some(s), Some(u)) = (since, until)
        && s >= u
    {
        v.add(&format!("{prefix}.until"), "must be after since");
    }
    v.finish(Filter { actor_id, action, resource_type, resource_id, outcome, since, until })
}

/// Where the next Query page starts: after this (occurred_at, sequence),
/// in newest-first order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageToken {
    /// The last event's occurred_at.
    pub occurred_at: DateTime<Utc>,
    /// The last event's sequence.
    pub sequence: u64,
}

const TOKEN_VERSION: u8 = 1;

impl PageToken {
    /// The opaque text form, bound to `filter`.
    pub fn encode(&self, filter: &Filter) -> String {
        let mut b = Vec::with_capacity(25);
        b.push(TOKEN_VERSION);
        b.extend(self.occurred_at.timestamp_micros().to_be_bytes());
        b.extend(self.sequence.to_be_bytes());
        b.extend(filter.fingerprint());
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
    }

    /// Parses a token made by [`PageToken::encode`] for the same `filter`.
    pub fn decode(text: &str, filter: &Filter) -> Result<Self, Error> {
        let bad = || Error::field("page_token", "is not a page token of this query");
        let b = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(text).map_err(|_| bad())?;
        if b.len() != 25 || b[0] != TOKEN_VERSION {
            return Err(bad());
        }
        if b[17..25] != filter.fingerprint() {
            return Err(Error::field("page_token", "was made for a different filter"));
        }
        let micros = i64::from_be_bytes(b[1..9].try_into().expect("8 bytes"));
        let sequence = u64::from_be_bytes(b[9..17].try_into().expect("8 bytes"));
        let occurred_at = DateTime::from_timestamp_micros(micros).ok_or_else(bad)?;
        Ok(Self { occurred_at, sequence })
    }
}

/// A validated Query.
#[derive(Debug, Clone)]
pub struct QueryCommand {
    /// Which events.
    pub filter: Filter,
    /// How many.
    pub page_size: usize,
    /// Where to start.
    pub after: Option<PageToken>,
}

/// Parses a Query.
pub fn parse_query(req: pb::QueryRequest) -> Result<QueryCommand, Error> {
    let filter = parse_filter(req.filter, "filter")?;
    let after = match req.page_token.as_str() {
        "" => None,
        t => Some(PageToken::decode(t, &filter)?),
    };
    let page_size = match req.page_size as usize {
        0 => DEFAULT_PAGE_SIZE,
        n => n.min(MAX_PAGE_SIZE),
    };
    Ok(QueryCommand { filter, page_size, after })
}

/// A sequence range as requested: 0 means "from the oldest retained" or
/// "to the head", resolved against the database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SequenceRange {
    /// First sequence, or `None` for the oldest retained.
    pub from: Option<u64>,
    /// Last sequence, or `None` for the head.
    pub to: Option<u64>,
}

/// Parses `from_sequence`/`to_sequence`.
pub fn parse_range(from: u64, to: u64) -> Result<SequenceRange, Error> {
    let from = (from != 0).then_some(from);
    let to = (to != 0).then_some(to);
    if let (Some(f), Some(t)) = (from, to)
        && f > t
    {
        return Err(Error::field("to_sequence", "must not be below from_sequence"));
    }
    if from.is_some_and(|f| f > i64::MAX as u64) || to.is_some_and(|t| t > i64::MAX as u64) {
        return Err(Error::field("from_sequence", "is beyond any sequence"));
    }
    Ok(SequenceRange { from, to })
}

#[cfg(test)]
mod tests {
    use tonic_types::FieldViolation;

    use super::*;

    fn valid() -> pb::AppendRequest {
        pb::AppendRequest {
            event: Some(pb::AuditEvent {
                actor: Some(pb::Actor { r#type: "user".into(), id: "42".into() }),
                action: "document.put".into(),
                outcome: pb::Outcome::Success as i32,
                ..Default::default()
            }),
            idempotency_key: String::new(),
        }
    }

    fn fields(e: Error) -> Vec<String> {
        match e {
            Error::InvalidArgument(v) => v.into_iter().map(|f: FieldViolation| f.field).collect(),
            other => panic!("not invalid argument: {other:?}"),
        }
    }

    fn parse(req: pb::AppendRequest) -> Result<AppendCommand, Error> {
        parse_append(req, Utc::now(), Duration::from_secs(300), &CallContext::default())
    }

    #[test]
    fn a_minimal_event_is_valid() {
        let c = parse(valid()).unwrap();
        assert_eq!(c.event.actor_id, "42");
        assert_eq!(c.event.occurred_at, None);
        assert_eq!(c.idempotency_key, None);
    }

    #[test]
    fn every_violation_is_reported() {
        let mut req = valid();
        let e = req.event.as_mut().unwrap();
        e.actor = None;
        e.action = " ".into();
        e.outcome = 0;
        e.trace_id = "xyz".into();
        e.source = Some(pb::Source { ip: "not-an-ip".into(), ..Default::default() });
        e.occurred_at = Some(prost_types::Timestamp { seconds: 0, nanos: -1 });
        let got = fields(parse(req).unwrap_err());
        for want in [
            "event.actor",
            "event.action",
            "event.outcome",
            "event.trace_id",
            "event.source.ip",
            "event.occurred_at",
        ] {
            assert!(got.iter().any(|g| g == want), "{want} missing from {got:?}");
        }
        assert_eq!(fields(parse(pb::AppendRequest::default()).unwrap_err()), ["event"]);
    }

    #[test]
    fn timestamps_out_of_range_or_in_the_future_are_refused() {
        for ts in [
            prost_types::Timestamp { seconds: 253_402_300_800, nanos: 0 },
            prost_types::Timestamp { seconds: -62_135_596_801, nanos: 0 },
            prost_types::Timestamp { seconds: 0, nanos: 1_000_000_000 },
            to_timestamp(Utc::now() + chrono::Duration::hours(1)),
        ] {
            let mut req = valid();
            req.event.as_mut().unwrap().occurred_at = Some(ts);
            assert_eq!(fields(parse(req).unwrap_err()), ["event.occurred_at"], "{ts:?}");
        }
        // sub-microsecond digits are cut, not refused
        let mut req = valid();
        req.event.as_mut().unwrap().occurred_at = Some(prost_types::Timestamp { seconds: 10, nanos: 1_999 });
        let t = parse(req).unwrap().event.occurred_at.unwrap();
        assert_eq!(t.timestamp_micros(), 10_000_001);
    }

    #[test]
    fn metadata_is_bounded_and_finite() {
        let big = prost_types::Struct {
            fields: [(
                "blob".to_owned(),
                prost_types::Value {
                    kind: Some(prost_types::value::Kind::StringValue("x".repeat(MAX_METADATA_BYTES))),
                },
            )]
            .into(),
        };
        let mut req = valid();
        req.event.as_mut().unwrap().metadata = Some(big);
        assert_eq!(fields(parse(req).unwrap_err()), ["event.metadata"]);

        let nan = prost_types::Struct {
            fields: [(
                "n".to_owned(),
                prost_types::Value { kind: Some(prost_types::value::Kind::NumberValue(f64::NAN)) },
            )]
            .into(),
        };
        let mut req = valid();
        req.event.as_mut().unwrap().metadata = Some(nan);
        assert_eq!(fields(parse(req).unwrap_err()), ["event.metadata.n"]);
    }

    #[test]
    fn metadata_is_kept_exactly_with_nulls_spelled_one_way() {
        use prost_types::{ListValue, Struct, Value};
        let v = |k| Value { kind: Some(k) };
        let list = ListValue {
            values: vec![Value { kind: None }, v(Kind::NullValue(7)), v(Kind::NumberValue(-0.0))],
        };
        let mut req = valid();
        req.event.as_mut().unwrap().metadata =
            Some(Struct { fields: [("l".to_owned(), v(Kind::ListValue(list)))].into() });
        let got = parse(req).unwrap().event.metadata;
        let Some(Kind::ListValue(l)) = &got.fields["l"].kind else { panic!("{got:?}") };
        assert_eq!(l.values[0].kind, Some(Kind::NullValue(0)));
        assert_eq!(l.values[1].kind, Some(Kind::NullValue(0)));
        let Some(Kind::NumberValue(z)) = l.values[2].kind else { panic!() };
        assert!(z == 0.0 && z.is_sign_negative(), "-0 is kept");
    }

    #[test]
    fn nul_characters_are_refused() {
        let mut req = valid();
        req.event.as_mut().unwrap().resource =
            Some(pb::Resource { r#type: "a\0b".into(), id: String::new() });
        assert_eq!(fields(parse(req).unwrap_err()), ["event.resource.type"]);
    }

    #[test]
    fn call_context_fills_request_and_trace_ids() {
        let call = CallContext {
            request_id: Some("rid-1".into()),
            trace_id: trace_id_of_traceparent("00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01"),
        };
        let c = parse_append(valid(), Utc::now(), Duration::ZERO, &call).unwrap();
        assert_eq!(c.event.request_id, "rid-1");
        assert_eq!(c.event.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(trace_id_of_traceparent("00-00000000000000000000000000000000-00f067aa0ba902b7-01"), None);
    }

    #[test]
    fn page_tokens_round_trip_and_are_bound_to_their_filter() {
        let f = Filter { actor_id: Some("42".into()), ..Default::default() };
        let t = PageToken { occurred_at: DateTime::from_timestamp_micros(1_234_567).unwrap(), sequence: 99 };
        let text = t.encode(&f);
        assert_eq!(PageToken::decode(&text, &f).unwrap(), t);
        let other = Filter { actor_id: Some("43".into()), ..Default::default() };
        assert_eq!(fields(PageToken::decode(&text, &other).unwrap_err()), ["page_token"]);
        assert_eq!(fields(PageToken::decode("garbage!", &f).unwrap_err()), ["page_token"]);
    }

    #[test]
    fn filters_validate_their_time_range() {
        let f = pb::EventFilter {
            since: Some(prost_types::Timestamp { seconds: 20, nanos: 0 }),
            until: Some(prost_types::Timestamp { seconds: 10, nanos: 0 }),
            ..Default::default()
        };
        assert_eq!(fields(parse_filter(Some(f), "filter").unwrap_err()), ["filter.until"]);
        assert_eq!(parse_filter(None, "filter").unwrap(), Filter::default());
    }
}
