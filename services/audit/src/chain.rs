//! The hash chain: an event's canonical encoding and its hash.
//!
//! `hash = SHA-256(prev_hash || canonical(event))`, where the first event's
//! `prev_hash` is 32 zero bytes. The canonical encoding is a length-prefixed
//! binary form with no optional parts, so two different events can never
//! encode alike and any implementation can reproduce it from the stored
//! columns. Integers are big-endian and `str(s) = u32 byte length || UTF-8 bytes`:
//!
//! ```text
//! "mesh.audit.v2\n"                       14 bytes, the encoding's version ("mesh.audit.v1\n")
//! u64 sequence
//! [16] id                                 the UUID's bytes
//! i64 occurred_at, i64 recorded_at        microseconds since the Unix epoch
//! str actor.type, str actor.id, str action, str resource.type, str resource.id
//! u8  outcome                             1 SUCCESS, 2 FAILURE, 3 DENIED
//! str source.ip, str source.user_agent, str source.service
//! str request_id, str trace_id
//! value metadata                          always an object
//!
//! value = 0x00                            null
//!       | 0x01 | 0x02                     false | true
//!       | 0x03 f64                        IEEE-754 binary64 bits (v1: -0 as +0)
//!       | 0x04 str                        string
//!       | 0x05 u32 count value*           list
//!       | 0x06 u32 count (str value)*     object, keys in ascending byte order
//! ```
//!
//! Numbers are binary64 because that is what `google.protobuf.Struct` holds.
//!
//! # Versions ([`HashVersion`], column `hash_version`)
//! - **v2** (every event appended since migration 0002): the metadata is
//!   stored as its protobuf encoding (`metadata_pb`), which reads decode, so
//!   the value hashed is the value read back, bit for bit, `-0` included.
//!   The `jsonb` column is a copy for SQL that Verify also checks.
//! - **v1** (events written before): the hash folded `-0` into `+0` and the
//!   metadata lives only in `jsonb`, whose `numeric`s hold each number's
//!   shortest decimal form exactly; reads parse it back with a correctly
//!   rounding parser ([`mesh_proto::json`]), so v1 events keep verifying
//!   under their own rule. Nothing is rewritten.
//!
//! The version is bound into the hash through the tag, so relabelling an
//! event's version breaks its hash.

use chrono::{DateTime, Utc};
use prost_types::{Struct, Value, value::Kind};
use sha2::{Digest, Sha256};
use uuid::Uuid;

/// A SHA-256 digest.
pub type Hash = [u8; 32];

/// The `prev_hash` of the first event.
pub const GENESIS: Hash = [0; 32];

/// Which rule an event was hashed under (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HashVersion {
    /// Before migration 0002: `-0` folded, metadata only in `jsonb`.
    V1 = 1,
    /// Exact: metadata stored as protobuf bytes, every bit hashed.
    V2 = 2,
}

impl HashVersion {
    /// The version every new event gets.
    pub const CURRENT: Self = Self::V2;

    /// The stored code.
    pub fn code(self) -> i16 {
        self as i16
    }

    /// The version with this stored code.
    pub fn from_code(code: i64) -> Option<Self> {
        match code {
            1 => Some(Self::V1),
            2 => Some(Self::V2),
            _ => None,
        }
    }

    /// The tag that starts the canonical encoding (and names its version).
    pub fn tag(self) -> &'static [u8; 14] {
        match self {
            Self::V1 => b"mesh.audit.v1\n",
            Self::V2 => b"mesh.audit.v2\n",
        }
    }
}

/// How the audited action ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// It succeeded.
    Success = 1,
    /// It failed.
    Failure = 2,
    /// It was refused.
    Denied = 3,
}

impl Outcome {
    /// The stored (and hashed) code.
    pub fn code(self) -> u8 {
        self as u8
    }

    /// The outcome with this stored code.
    pub fn from_code(code: i64) -> Option<Self> {
        match code {
            1 => Some(Self::Success),
            2 => Some(Self::Failure),
            3 => Some(Self::Denied),
            _ => None,
        }
    }

    /// `SUCCESS`, `FAILURE` or `DENIED`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Success => "SUCCESS",
            Self::Failure => "FAILURE",
            Self::Denied => "DENIED",
        }
    }
}

/// One event as stored: everything the hash covers, plus the hashes.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// The rule its hash follows.
    pub version: HashVersion,
    /// Position in the chain, from 1.
    pub sequence: u64,
    /// Event id (UUIDv7).
    pub id: Uuid,
    /// When the action happened (microsecond precision).
    pub occurred_at: DateTime<Utc>,
    /// When the event was sequenced (microsecond precision).
    pub recorded_at: DateTime<Utc>,
    /// Actor kind.
    pub actor_type: String,
    /// Actor id.
    pub actor_id: String,
    /// What was done.
    pub action: String,
    /// Resource kind.
    pub resource_type: String,
    /// Resource id.
    pub resource_id: String,
    /// How it ended.
    pub outcome: Outcome,
    /// Client IP.
    pub source_ip: String,
    /// Client User-Agent.
    pub source_user_agent: String,
    /// Recording service.
    pub source_service: String,
    /// Request id.
    pub request_id: String,
    /// Trace id.
    pub trace_id: String,
    /// Free-form details, exactly as appended (nulls spelled `NULL_VALUE`).
    pub metadata: Struct,
    /// Hash of the previous event.
    pub prev_hash: Hash,
    /// This event's hash.
    pub hash: Hash,
}

impl Event {
    /// The canonical encoding of this event (see the module docs).
    pub fn canonical(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(256);
        out.extend_from_slice(self.version.tag());
        out.extend_from_slice(&self.sequence.to_be_bytes());
        out.extend_from_slice(self.id.as_bytes());
        out.extend_from_slice(&self.occurred_at.timestamp_micros().to_be_bytes());
        out.extend_from_slice(&self.recorded_at.timestamp_micros().to_be_bytes());
        for s in [&self.actor_type, &self.actor_id, &self.action, &self.resource_type, &self.resource_id] {
            put_str(&mut out, s);
        }
        out.push(self.outcome.code());
        for s in
            [&self.source_ip, &self.source_user_agent, &self.source_service, &self.request_id, &self.trace_id]
        {
            put_str(&mut out, s);
        }
        let fold = self.version == HashVersion::V1;
        put_object(&mut out, &self.metadata, fold);
        out
    }

    /// `SHA-256(prev_hash || canonical)`, from the fields as they are now.
    pub fn compute_hash(&self) -> Hash {
        let mut h = Sha256::new();
        h.update(self.prev_hash);
        h.update(self.canonical());
        h.finalize().into()
    }

    /// Sets `prev_hash` and then `hash`: the event becomes the next link after `prev`.
    pub fn seal(&mut self, prev: Hash) {
        self.prev_hash = prev;
        self.hash = self.compute_hash();
    }
}

fn put_len(out: &mut Vec<u8>, n: usize) {
    // Inputs are bounded far below 4 GiB (64 KiB metadata, short strings).
    out.extend_from_slice(&u32::try_from(n).expect("length fits in u32").to_be_bytes());
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    put_len(out, s.len());
    out.extend_from_slice(s.as_bytes());
}

fn put_object(out: &mut Vec<u8>, s: &Struct, fold: bool) {
    out.push(0x06);
    put_len(out, s.fields.len());
    // A BTreeMap: already in ascending byte order of the keys.
    for (k, v) in &s.fields {
        put_str(out, k);
        put_value(out, v, fold);
    }
}

fn put_value(out: &mut Vec<u8>, v: &Value, fold: bool) {
    match &v.kind {
        None | Some(Kind::NullValue(_)) => out.push(0x00),
        Some(Kind::BoolValue(false)) => out.push(0x01),
        Some(Kind::BoolValue(true)) => out.push(0x02),
        Some(Kind::NumberValue(n)) => {
            out.push(0x03);
            let n = if fold { normalize_f64(*n) } else { *n };
            out.extend_from_slice(&n.to_bits().to_be_bytes());
        }
        Some(Kind::StringValue(s)) => {
            out.push(0x04);
            put_str(out, s);
        }
        Some(Kind::ListValue(l)) => {
            out.push(0x05);
            put_len(out, l.values.len());
            for item in &l.values {
                put_value(out, item, fold);
            }
        }
        Some(Kind::StructValue(s)) => put_object(out, s, fold),
    }
}

/// Folds `-0.0` into `+0.0` (what v1 hashed: `jsonb` loses the sign of zero).
pub fn normalize_f64(x: f64) -> f64 {
    if x == 0.0 { 0.0 } else { x }
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;
    use serde_json::json;

    use super::*;

    fn obj(v: serde_json::Value) -> Struct {
        mesh_proto::json::from_json(v.as_object().expect("an object"))
    }

    fn event() -> Event {
        let mut e = Event {
            version: HashVersion::V2,
            sequence: 7,
            id: Uuid::from_bytes([0x11; 16]),
            occurred_at: Utc.timestamp_micros(1_700_000_000_123_456).unwrap(),
            recorded_at: Utc.timestamp_micros(1_700_000_001_000_001).unwrap(),
            actor_type: "user".into(),
            actor_id: "42".into(),
            action: "session.create".into(),
            resource_type: "session".into(),
            resource_id: "s-1".into(),
            outcome: Outcome::Denied,
            source_ip: "10.0.0.1".into(),
            source_user_agent: "curl/8".into(),
            source_service: "mesh-session".into(),
            request_id: "r".into(),
            trace_id: String::new(),
            metadata: obj(json!({"b": [1.5, null, true], "a": {"z": "x"}})),
            prev_hash: [0xAB; 32],
            hash: [0; 32],
        };
        e.seal([0xAB; 32]);
        e
    }

    /// The encoding written out byte by byte from the specification in the
    /// module docs, independently of the encoder.
    #[test]
    fn canonical_encoding_follows_the_specification() {
        let e = event();
        let mut want: Vec<u8> = b"mesh.audit.v2\n".to_vec();
        want.extend([0, 0, 0, 0, 0, 0, 0, 7]);
        want.extend([0x11; 16]);
        want.extend(1_700_000_000_123_456_i64.to_be_bytes());
        want.extend(1_700_000_001_000_001_i64.to_be_bytes());
        for s in ["user", "42", "session.create", "session", "s-1"] {
            want.extend((s.len() as u32).to_be_bytes());
            want.extend(s.as_bytes());
        }
        want.push(3);
        for s in ["10.0.0.1", "curl/8", "mesh-session", "r", ""] {
            want.extend((s.len() as u32).to_be_bytes());
            want.extend(s.as_bytes());
        }
        // {"a": {"z": "x"}, "b": [1.5, null, true]}, keys sorted
        want.extend([0x06, 0, 0, 0, 2]);
        want.extend([0, 0, 0, 1, b'a', 0x06, 0, 0, 0, 1, 0, 0, 0, 1, b'z', 0x04, 0, 0, 0, 1, b'x']);
        want.extend([0, 0, 0, 1, b'b', 0x05, 0, 0, 0, 3, 0x03]);
        want.extend(1.5_f64.to_bits().to_be_bytes());
        want.extend([0x00, 0x02]);
        assert_eq!(e.canonical(), want);

        let mut h = Sha256::new();
        h.update([0xAB; 32]);
        h.update(&want);
        let want_hash: Hash = h.finalize().into();
        assert_eq!(e.hash, want_hash);
        assert_eq!(e.compute_hash(), e.hash);

        // v1 differs only in its tag (for values without -0)
        let mut v1 = e.clone();
        v1.version = HashVersion::V1;
        want[..14].copy_from_slice(b"mesh.audit.v1\n");
        assert_eq!(v1.canonical(), want);
    }

    #[test]
    fn every_field_is_covered() {
        let base = event();
        type Edit = Box<dyn Fn(&mut Event)>;
        let edits: Vec<Edit> = vec![
            Box::new(|e| e.sequence += 1),
            Box::new(|e| e.id = Uuid::from_bytes([0x12; 16])),
            Box::new(|e| e.occurred_at += chrono::Duration::microseconds(1)),
            Box::new(|e| e.recorded_at += chrono::Duration::microseconds(1)),
            Box::new(|e| e.actor_type.push('x')),
            Box::new(|e| e.actor_id.push('x')),
            Box::new(|e| e.action.push('x')),
            Box::new(|e| e.resource_type.push('x')),
            Box::new(|e| e.resource_id.push('x')),
            Box::new(|e| e.outcome = Outcome::Success),
            Box::new(|e| e.source_ip.push('x')),
            Box::new(|e| e.source_user_agent.push('x')),
            Box::new(|e| e.source_service.push('x')),
            Box::new(|e| e.request_id.push('x')),
            Box::new(|e| e.trace_id.push('x')),
            Box::new(|e| {
                e.metadata.fields.insert("c".into(), Value { kind: Some(Kind::NullValue(0)) });
            }),
            Box::new(|e| e.prev_hash[0] ^= 1),
            Box::new(|e| e.version = HashVersion::V1),
        ];
        for (i, edit) in edits.iter().enumerate() {
            let mut e = base.clone();
            edit(&mut e);
            assert_ne!(e.compute_hash(), base.hash, "edit {i} is not covered by the hash");
        }
    }

    #[test]
    fn length_prefixes_keep_field_boundaries() {
        let mut a = event();
        let mut b = event();
        a.actor_type = "ab".into();
        a.actor_id = "c".into();
        b.actor_type = "a".into();
        b.actor_id = "bc".into();
        assert_ne!(a.canonical(), b.canonical());
        // the same for a string that looks like an encoded value
        a.metadata = obj(json!({"k": "\u{4}"}));
        b.metadata = obj(json!({"k": [null]}));
        assert_ne!(a.canonical(), b.canonical());
    }

    #[test]
    fn key_order_does_not_matter_and_negative_zero_does_from_v2() {
        let mut a = event();
        let mut b = event();
        a.metadata = mesh_proto::json::parse(r#"{"x": 0.0, "y": {"q": 1, "p": 2}}"#).unwrap();
        b.metadata = mesh_proto::json::parse(r#"{"y": {"p": 2, "q": 1}, "x": -0.0}"#).unwrap();
        assert_ne!(a.canonical(), b.canonical(), "v2 hashes the sign of zero");
        a.version = HashVersion::V1;
        b.version = HashVersion::V1;
        assert_eq!(a.canonical(), b.canonical(), "v1 folded -0 into +0");
        // 1 and 1.0 are the same binary64
        b.version = HashVersion::V2;
        a.version = HashVersion::V2;
        b.metadata = mesh_proto::json::parse(r#"{"y": {"p": 2.0, "q": 1.0}, "x": 0}"#).unwrap();
        assert_eq!(a.canonical(), b.canonical());
        // a Value without a kind is null, as NULL_VALUE is
        a.metadata = Struct { fields: [("n".to_owned(), Value { kind: None })].into() };
        b.metadata = obj(json!({"n": null}));
        assert_eq!(a.canonical(), b.canonical());
    }
}
