//! Export: a filtered sequence range as JSON lines, in chain order. Used by
//! the Export RPC and `mesh-audit export`; `mesh-audit verify --file`
//! re-checks such a file without the database.
//!
//! One line per event:
//!
//! ```json
//! {"sequence":1,"id":"…","occurred_at":"2025-01-31T12:00:00.000000Z","recorded_at":"…",
//!  "actor":{"type":"user","id":"42"},"action":"session.create",
//!  "resource":{"type":"session","id":"…"},"outcome":"SUCCESS",
//!  "source":{"ip":"…","user_agent":"…","service":"mesh-session"},
//!  "request_id":"…","trace_id":"…","metadata":{…},"prev_hash":"<hex>","hash":"<hex>",
//!  "hash_version":2}
//! ```
//!
//! Metadata numbers are written in their shortest exact form and read back
//! into the very same doubles ([`mesh_proto::json`]), `-0.0` included, so a
//! line re-verifies offline. A line without `hash_version` (exported before
//! it existed) is a v1 event.

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{Value, json};
use sqlx::PgPool;
use tokio::sync::mpsc;

use mesh_proto::json::{AsJson, from_json};

use crate::{
    chain::{Event, Hash, HashVersion, Outcome},
    domain::{Filter, SequenceRange},
    error::Error,
    store,
};

/// Roughly how many bytes of lines go into one chunk.
const CHUNK_BYTES: usize = 256 * 1024;

/// Whole JSON lines and the sequence of the last one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    /// Lines, each ending in `\n`.
    pub lines: String,
    /// The last event's sequence.
    pub last_sequence: u64,
}

fn time(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

/// One event as a JSON line (with its newline).
pub fn to_json_line(e: &Event) -> String {
    let v = json!({
        "sequence": e.sequence,
        "id": e.id.to_string(),
        "occurred_at": time(e.occurred_at),
        "recorded_at": time(e.recorded_at),
        "actor": {"type": e.actor_type, "id": e.actor_id},
        "action": e.action,
        "resource": {"type": e.resource_type, "id": e.resource_id},
        "outcome": e.outcome.as_str(),
        "source": {"ip": e.source_ip, "user_agent": e.source_user_agent, "service": e.source_service},
        "request_id": e.request_id,
        "trace_id": e.trace_id,
        "metadata": AsJson(&e.metadata),
        "prev_hash": hex::encode(e.prev_hash),
        "hash": hex::encode(e.hash),
        "hash_version": e.version.code(),
    });
    let mut line = v.to_string();
    line.push('\n');
    line
}

/// Parses a line made by [`to_json_line`].
pub fn from_json_line(line: &str) -> Result<Event, String> {
    let v: Value = serde_json::from_str(line).map_err(|e| format!("not JSON: {e}"))?;
    let s = |path: &[&str]| -> Result<String, String> {
        let mut cur = &v;
        for p in path {
            cur = cur.get(p).ok_or_else(|| format!("{} is missing", path.join(".")))?;
        }
        cur.as_str().map(str::to_owned).ok_or_else(|| format!("{} is not a string", path.join(".")))
    };
    let t = |name: &str| -> Result<DateTime<Utc>, String> {
        DateTime::parse_from_rfc3339(&s(&[name])?)
            .map(|t| t.with_timezone(&Utc))
            .map_err(|e| format!("{name}: {e}"))
    };
    let h = |name: &str| -> Result<Hash, String> {
        hex::decode(s(&[name])?)
            .ok()
            .and_then(|b| Hash::try_from(b).ok())
            .ok_or_else(|| format!("{name} is not 32 bytes of hex"))
    };
    let outcome = match s(&["outcome"])?.as_str() {
        "SUCCESS" => Outcome::Success,
        "FAILURE" => Outcome::Failure,
        "DENIED" => Outcome::Denied,
        other => return Err(format!("unknown outcome {other:?}")),
    };
    let version = match v.get("hash_version") {
        None => HashVersion::V1,
        Some(n) => n.as_i64().and_then(HashVersion::from_code).ok_or("hash_version is not 1 or 2")?,
    };
    Ok(Event {
        version,
        sequence: v.get("sequence").and_then(Value::as_u64).ok_or("sequence is missing")?,
        id: s(&["id"])?.parse().map_err(|e| format!("id: {e}"))?,
        occurred_at: t("occurred_at")?,
        recorded_at: t("recorded_at")?,
        actor_type: s(&["actor", "type"])?,
        actor_id: s(&["actor", "id"])?,
        action: s(&["action"])?,
        resource_type: s(&["resource", "type"])?,
        resource_id: s(&["resource", "id"])?,
        outcome,
        source_ip: s(&["source", "ip"])?,
        source_user_agent: s(&["source", "user_agent"])?,
        source_service: s(&["source", "service"])?,
        request_id: s(&["request_id"])?,
        trace_id: s(&["trace_id"])?,
        metadata: from_json(v.get("metadata").and_then(Value::as_object).ok_or("metadata is not an object")?),
        prev_hash: h("prev_hash")?,
        hash: h("hash")?,
    })
}

/// Resolves `range` against `db` and picks a pool that holds all of it.
pub(crate) async fn plan(db: &mesh_db::Db, range: SequenceRange) -> Result<(PgPool, u64, u64), Error> {
    let head = store::read_head(db.primary()).await?.last();
    let to = range.to.unwrap_or(head);
    if to > head {
        return Err(Error::OutOfRange(format!("to_sequence {to} is beyond the head, {head}")));
    }
    let pool = store::covering(db, to).await?;
    Ok((pool, range.from.unwrap_or(1), to))
}

/// Sends the events `from..=to` matching `filter` as chunks of lines.
/// Reads keyset pages of at most `page` rows, each its own statement on
/// the pool (no transaction spans the export; events are never changed, so
/// the pages join into the same lines one read would give). Returns when
/// done, on an error (also sent), or when the receiver is gone.
pub(crate) async fn run(
    pool: PgPool,
    filter: Filter,
    from: u64,
    to: u64,
    page: usize,
    tx: mpsc::Sender<Result<Chunk, Error>>,
) {
    let mut cursor = from.saturating_sub(1);
    let mut chunk = Chunk { lines: String::new(), last_sequence: 0 };
    while cursor < to {
        let events = match store::range_page(&pool, &filter, cursor, to, page).await {
            Ok(events) => events,
            Err(e) => {
                let _ = tx.send(Err(e)).await;
                return;
            }
        };
        let full = events.len() == page;
        for e in &events {
            chunk.lines.push_str(&to_json_line(e));
            chunk.last_sequence = e.sequence;
            if chunk.lines.len() >= CHUNK_BYTES {
                let c = std::mem::replace(&mut chunk, Chunk { lines: String::new(), last_sequence: 0 });
                if tx.send(Ok(c)).await.is_err() {
                    return;
                }
            }
        }
        cursor = match (full, events.last()) {
            (true, Some(last)) => last.sequence,
            _ => to,
        };
    }
    if !chunk.lines.is_empty() {
        let _ = tx.send(Ok(chunk)).await;
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;
    use uuid::Uuid;

    use super::*;
    use crate::chain::GENESIS;

    #[test]
    fn lines_round_trip_and_still_verify() {
        let mut e = Event {
            version: HashVersion::V2,
            sequence: 3,
            id: Uuid::now_v7(),
            occurred_at: DateTime::from_timestamp_micros(1_700_000_000_000_001).unwrap(),
            recorded_at: DateTime::from_timestamp_micros(1_700_000_000_500_000).unwrap(),
            actor_type: "user".into(),
            actor_id: "42".into(),
            action: "document.put".into(),
            resource_type: "document".into(),
            resource_id: "d/1".into(),
            outcome: Outcome::Failure,
            source_ip: "::1".into(),
            source_user_agent: "ua \"quoted\"\n".into(),
            source_service: "mesh-data".into(),
            request_id: "r".into(),
            trace_id: "4bf92f3577b34da6a3ce929d0e0e4736".into(),
            metadata: from_json(
                json!({"n": 0.1, "max": f64::MAX, "tiny": 5e-324, "z": -0.0, "deep": {"list": [1, "two", null]}})
                    .as_object()
                    .unwrap(),
            ),
            prev_hash: GENESIS,
            hash: GENESIS,
        };
        e.seal([7; 32]);
        let line = to_json_line(&e);
        assert!(line.ends_with('\n') && !line[..line.len() - 1].contains('\n'));
        let back = from_json_line(&line).unwrap();
        assert_eq!(back, e);
        assert_eq!(back.canonical(), e.canonical(), "bit for bit, -0 included");
        assert_eq!(back.compute_hash(), e.hash);
        // an export from before hash versions is v1
        let mut old: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(old.as_object_mut().unwrap().remove("hash_version"), Some(json!(2)));
        assert_eq!(from_json_line(&old.to_string()).unwrap().version, HashVersion::V1);
    }
}
