//! Every SQL statement of the service: the chain head, group-commit inserts,
//! idempotency lookups, partitions, and the keyset reads behind Query, Tail,
//! Export and Verify. Statements are parameterised; the few whose shape
//! depends on the filter are built once per shape and kept (see [`shaped`]).

use std::{
    collections::HashMap,
    sync::{Mutex, OnceLock},
};

use chrono::{DateTime, Utc};
use mesh_db::{span_for, span_on};
use prost::Message as _;
use prost_types::Struct;
use sqlx::{
    Connection as _, PgConnection, PgPool, Postgres,
    postgres::{PgArguments, PgConnectOptions},
    query::QueryAs,
};
use tracing::Instrument as _;
use uuid::Uuid;

use crate::{
    chain::{Event, Hash, HashVersion, Outcome},
    domain::{Filter, PageToken},
    error::Error,
};

/// The role the service serves as (created by the migrations).
pub const WRITER_ROLE: &str = "mesh_audit_writer";

/// The columns of an event, in [`Row`] order. Reads never decode `jsonb`
/// in the driver: its text is only fetched for v1 events (whose metadata it
/// is) and parsed by [`Row::into_event`], which names the event if it fails.
const COLUMNS: &str = "sequence, id, occurred_at, recorded_at, actor_type, actor_id, action, resource_type, \
     resource_id, outcome, source_ip, source_user_agent, source_service, request_id, trace_id, hash_version, \
     case when metadata_pb is null then metadata::text end as metadata_json, metadata_pb, prev_hash, hash";

/// An event row exactly as stored; [`Row::into_event`] checks it can be an event.
#[derive(Debug, Clone, sqlx::FromRow)]
pub(crate) struct Row {
    pub(crate) sequence: i64,
    id: Uuid,
    occurred_at: DateTime<Utc>,
    recorded_at: DateTime<Utc>,
    actor_type: String,
    actor_id: String,
    action: String,
    resource_type: String,
    resource_id: String,
    outcome: i16,
    source_ip: String,
    source_user_agent: String,
    source_service: String,
    request_id: String,
    trace_id: String,
    hash_version: i16,
    /// The `jsonb` copy as text (Verify), or only for events without `metadata_pb` (reads).
    metadata_json: Option<String>,
    /// The metadata's protobuf encoding (v2).
    metadata_pb: Option<Vec<u8>>,
    prev_hash: Vec<u8>,
    hash: Vec<u8>,
}

impl Row {
    /// The event, or why this row cannot be one (only after tampering).
    pub(crate) fn into_event(self) -> Result<Event, String> {
        let version = HashVersion::from_code(self.hash_version.into())
            .ok_or_else(|| format!("unknown hash_version {}", self.hash_version))?;
        let metadata = match (version, &self.metadata_pb, &self.metadata_json) {
            (HashVersion::V2, Some(pb), _) => {
                Struct::decode(pb.as_slice()).map_err(|e| format!("metadata_pb does not decode: {e}"))?
            }
            (HashVersion::V1, None, Some(text)) => {
                mesh_proto::json::parse(text).map_err(|why| format!("metadata {why}"))?
            }
            (HashVersion::V2, None, _) => return Err("metadata_pb is missing".to_owned()),
            (HashVersion::V1, Some(_), _) => return Err("a v1 event has metadata_pb".to_owned()),
            (HashVersion::V1, None, None) => return Err("metadata is missing".to_owned()),
        };
        Ok(Event {
            version,
            sequence: u64::try_from(self.sequence).map_err(|_| "negative sequence")?,
            id: self.id,
            occurred_at: self.occurred_at,
            recorded_at: self.recorded_at,
            actor_type: self.actor_type,
            actor_id: self.actor_id,
            action: self.action,
            resource_type: self.resource_type,
            resource_id: self.resource_id,
            outcome: Outcome::from_code(self.outcome.into()).ok_or("unknown outcome")?,
            source_ip: self.source_ip,
            source_user_agent: self.source_user_agent,
            source_service: self.source_service,
            request_id: self.request_id,
            trace_id: self.trace_id,
            metadata,
            prev_hash: self.prev_hash.try_into().map_err(|_| "prev_hash is not 32 bytes")?,
            hash: self.hash.try_into().map_err(|_| "hash is not 32 bytes")?,
        })
    }

    /// Whether the `jsonb` copy (fetched as text) holds the same metadata
    /// as `event`, which was read from `metadata_pb`: numbers compared as
    /// doubles, so `-0` (which `numeric` cannot hold) equals `0`.
    pub(crate) fn json_copy_matches(&self, event: &Event) -> Result<(), String> {
        let Some(text) = &self.metadata_json else { return Err("the jsonb metadata is missing".to_owned()) };
        match mesh_proto::json::parse(text) {
            Ok(copy) if copy == event.metadata => Ok(()),
            Ok(_) => Err("its jsonb metadata differs from the hashed metadata_pb".to_owned()),
            Err(why) => Err(format!("its jsonb metadata {why}")),
        }
    }
}

/// Rows as events; the first row that cannot be one fails the read, naming
/// its sequence (DATA_LOSS).
fn rows_to_events(rows: Vec<Row>) -> Result<Vec<Event>, Error> {
    rows.into_iter()
        .map(|r| {
            let sequence = r.sequence;
            r.into_event().map_err(|why| Error::Unreadable { sequence, why })
        })
        .collect()
}

/// The chain head: where the next event goes and what it links to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Head {
    /// The sequence the next event gets.
    pub(crate) next_sequence: u64,
    /// The last event's hash (genesis before the first).
    pub(crate) hash: Hash,
    /// The last event's recorded_at.
    pub(crate) recorded_at: Option<DateTime<Utc>>,
}

impl Head {
    /// The last sequence written (0 before the first).
    pub(crate) fn last(&self) -> u64 {
        self.next_sequence - 1
    }
}

type HeadRow = (i64, Vec<u8>, Option<DateTime<Utc>>);

fn head_from(row: HeadRow) -> Result<Head, sqlx::Error> {
    let (next, hash, recorded_at) = row;
    Ok(Head {
        next_sequence: u64::try_from(next)
            .map_err(|_| sqlx::Error::Decode("negative next_sequence".into()))?,
        hash: hash.try_into().map_err(|_| sqlx::Error::Decode("head hash is not 32 bytes".into()))?,
        recorded_at,
    })
}

const READ_HEAD: &str = "select next_sequence, head_hash, recorded_at from audit_chain_head where chain = 1";

/// A connection of its own for the batch task: its commits are
/// asynchronous (`synchronous_commit = off`, see `appender`: durability comes
/// from the flusher), so it must never serve anything else.
///
/// The statements below that take a `&mut PgConnection` also take the
/// `server` options it was made from (`options` here, or the connect
/// options of the pool it came from), which their spans name
/// (`server.address`, `server.port`).
pub(crate) async fn batch_connection(options: &PgConnectOptions) -> Result<PgConnection, sqlx::Error> {
    let options = options.clone().options([("synchronous_commit", "off")]);
    PgConnection::connect_with(&options).await
}

/// Opens a transaction holding the chain head lock, in one round trip: the
/// exact path, taken when the head may have moved since this instance last
/// wrote (another instance appended) or a key may already exist.
///
/// Its statements are planned for their arguments: a generic plan cached
/// while the idempotency table was small would go on scanning it whole once
/// it is large (until autoanalyze replans).
pub(crate) async fn begin_locked<'c>(
    conn: &'c mut PgConnection,
    server: &PgConnectOptions,
) -> Result<sqlx::Transaction<'c, Postgres>, sqlx::Error> {
    const BEGIN: &str = "BEGIN; SET LOCAL plan_cache_mode = force_custom_plan; \
                         SELECT 1 FROM audit_chain_head WHERE chain = 1 FOR UPDATE";
    conn.begin_with(BEGIN).instrument(span_for(server, "SELECT", "audit_chain_head", BEGIN)).await
}

/// Reads the chain head without locking it.
pub(crate) async fn read_head(pool: &PgPool) -> Result<Head, sqlx::Error> {
    read_head_with(pool, span_on(pool, "SELECT", "audit_chain_head", READ_HEAD)).await
}

/// [`read_head`] on a connection (e.g. in a transaction) made from `server`.
pub(crate) async fn read_head_in(
    conn: &mut PgConnection,
    server: &PgConnectOptions,
) -> Result<Head, sqlx::Error> {
    read_head_with(conn, span_for(server, "SELECT", "audit_chain_head", READ_HEAD)).await
}

async fn read_head_with<'e, E>(executor: E, span: tracing::Span) -> Result<Head, sqlx::Error>
where
    E: sqlx::Executor<'e, Database = Postgres>,
{
    let row: HeadRow = sqlx::query_as(READ_HEAD).fetch_one(executor).instrument(span).await?;
    head_from(row)
}

/// A first result recorded for an idempotency key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FirstResult {
    pub(crate) id: Uuid,
    pub(crate) sequence: u64,
    pub(crate) hash: Hash,
    /// The first request's fingerprint (none for keys recorded before it was kept).
    pub(crate) request_hash: Option<Hash>,
}

const HEAD_AND_KEYS: &str = "select h.next_sequence, h.head_hash, h.recorded_at, \
       k.source_service, k.idempotency_key, k.id, k.sequence, k.hash, k.request_hash \
     from audit_chain_head h left join ( \
       select k.* from audit_idempotency k \
       join unnest($1::text[], $2::text[]) as q(source_service, idempotency_key) \
       using (source_service, idempotency_key) \
     ) k on true \
     where h.chain = 1";

type HeadKeyRow = (
    i64,
    Vec<u8>,
    Option<DateTime<Utc>>,
    Option<String>,
    Option<String>,
    Option<Uuid>,
    Option<i64>,
    Option<Vec<u8>>,
    Option<Vec<u8>>,
);

/// The head, and the first results of those (source service, key) pairs
/// that have one. Under the head lock, so this statement's snapshot holds
/// every earlier batch and no other batch is adding keys meanwhile.
pub(crate) async fn head_and_keys(
    conn: &mut PgConnection,
    server: &PgConnectOptions,
    keys: &[(&str, &str)],
) -> Result<(Head, HashMap<(String, String), FirstResult>), sqlx::Error> {
    let services: Vec<&str> = keys.iter().map(|k| k.0).collect();
    let names: Vec<&str> = keys.iter().map(|k| k.1).collect();
    let rows: Vec<HeadKeyRow> = sqlx::query_as(HEAD_AND_KEYS)
        .bind(services)
        .bind(names)
        .fetch_all(conn)
        .instrument(span_for(server, "SELECT", "audit_chain_head", HEAD_AND_KEYS))
        .await?;
    let first = rows.first().ok_or_else(|| sqlx::Error::Decode("no chain head row".into()))?;
    let head = head_from((first.0, first.1.clone(), first.2))?;
    let mut known = HashMap::new();
    for (_, _, _, service, key, id, sequence, hash, request_hash) in rows {
        if let (Some(service), Some(key), Some(id), Some(sequence), Some(hash)) =
            (service, key, id, sequence, hash)
        {
            let hash =
                hash.try_into().map_err(|_| sqlx::Error::Decode("stored hash is not 32 bytes".into()))?;
            let request_hash = request_hash.and_then(|h| Hash::try_from(h).ok());
            known.insert((service, key), FirstResult { id, sequence: sequence as u64, hash, request_hash });
        }
    }
    Ok((head, known))
}

const INSERT_BATCH: &str = "with head as ( \
       update audit_chain_head set next_sequence = $24, head_hash = $25, recorded_at = $4 \
       where chain = 1 and next_sequence = $26 and head_hash = $27 \
       returning 1 \
     ), events as ( \
       insert into audit_events (sequence, id, occurred_at, recorded_at, actor_type, actor_id, action, \
         resource_type, resource_id, outcome, source_ip, source_user_agent, source_service, request_id, \
         trace_id, metadata, prev_hash, hash, hash_version, metadata_pb) \
       select e.sequence, e.id, e.occurred_at, $4, e.actor_type, e.actor_id, e.action, e.resource_type, \
         e.resource_id, e.outcome, e.source_ip, e.source_user_agent, e.source_service, e.request_id, \
         e.trace_id, e.metadata::jsonb, e.prev_hash, e.hash, e.hash_version, e.metadata_pb \
       from unnest($1::bigint[], $2::uuid[], $3::timestamptz[], $5::text[], $6::text[], $7::text[], \
         $8::text[], $9::text[], $10::smallint[], $11::text[], $12::text[], $13::text[], $14::text[], \
         $15::text[], $16::text[], $17::bytea[], $18::bytea[], $28::smallint[], $29::bytea[]) \
         as e(sequence, id, occurred_at, actor_type, actor_id, action, resource_type, resource_id, outcome, \
         source_ip, source_user_agent, source_service, request_id, trace_id, metadata, prev_hash, hash, \
         hash_version, metadata_pb) \
       where exists (select 1 from head) \
     ), keys as ( \
       insert into audit_idempotency (source_service, idempotency_key, sequence, id, hash, request_hash) \
       select * from unnest($19::text[], $20::text[], $21::bigint[], $22::uuid[], $23::bytea[], $30::bytea[]) \
       where exists (select 1 from head) \
     ) \
     select count(*) from head";

/// An idempotency key to record with the batch.
#[derive(Debug)]
pub(crate) struct NewKey<'a> {
    pub(crate) source_service: &'a str,
    pub(crate) key: &'a str,
    pub(crate) id: Uuid,
    pub(crate) sequence: u64,
    pub(crate) hash: Hash,
    /// The request's fingerprint.
    pub(crate) request_hash: Hash,
}

/// Writes a sealed batch (consecutive sequences, one recorded_at, chained
/// on `after`), its idempotency keys and the new head in one statement, if
/// and only if the chain head is still `after`; returns whether it was.
///
/// The head row's UPDATE comes first: it waits for any batch holding the
/// row, then re-checks the condition against the row as that batch left it,
/// and the inserts only happen if it matched. A key that already exists
/// fails the whole statement with a unique violation. Either way nothing is
/// written, and the caller takes the exact path under the lock.
pub(crate) async fn insert_batch(
    conn: &mut PgConnection,
    server: &PgConnectOptions,
    events: &[Event],
    keys: &[NewKey<'_>],
    after: &Head,
) -> Result<bool, sqlx::Error> {
    let last = events.last().expect("a batch has events");
    let col = |f: fn(&Event) -> String| events.iter().map(f).collect::<Vec<String>>();
    let matched: i64 = sqlx::query_scalar(INSERT_BATCH)
        .bind(events.iter().map(|e| e.sequence as i64).collect::<Vec<_>>())
        .bind(events.iter().map(|e| e.id).collect::<Vec<_>>())
        .bind(events.iter().map(|e| e.occurred_at).collect::<Vec<_>>())
        .bind(last.recorded_at)
        .bind(col(|e| e.actor_type.clone()))
        .bind(col(|e| e.actor_id.clone()))
        .bind(col(|e| e.action.clone()))
        .bind(col(|e| e.resource_type.clone()))
        .bind(col(|e| e.resource_id.clone()))
        .bind(events.iter().map(|e| i16::from(e.outcome.code())).collect::<Vec<_>>())
        .bind(col(|e| e.source_ip.clone()))
        .bind(col(|e| e.source_user_agent.clone()))
        .bind(col(|e| e.source_service.clone()))
        .bind(col(|e| e.request_id.clone()))
        .bind(col(|e| e.trace_id.clone()))
        .bind(col(|e| mesh_proto::json::to_json(&e.metadata)))
        .bind(events.iter().map(|e| e.prev_hash.to_vec()).collect::<Vec<_>>())
        .bind(events.iter().map(|e| e.hash.to_vec()).collect::<Vec<_>>())
        .bind(keys.iter().map(|k| k.source_service).collect::<Vec<_>>())
        .bind(keys.iter().map(|k| k.key).collect::<Vec<_>>())
        .bind(keys.iter().map(|k| k.sequence as i64).collect::<Vec<_>>())
        .bind(keys.iter().map(|k| k.id).collect::<Vec<_>>())
        .bind(keys.iter().map(|k| k.hash.to_vec()).collect::<Vec<_>>())
        .bind(last.sequence as i64 + 1)
        .bind(last.hash.to_vec())
        .bind(after.next_sequence as i64)
        .bind(after.hash.to_vec())
        .bind(events.iter().map(|e| e.version.code()).collect::<Vec<_>>())
        .bind(events.iter().map(|e| e.metadata.encode_to_vec()).collect::<Vec<_>>())
        .bind(keys.iter().map(|k| k.request_hash.to_vec()).collect::<Vec<_>>())
        .fetch_one(conn)
        .instrument(span_for(server, "INSERT", "audit_events", INSERT_BATCH))
        .await?;
    Ok(matched == 1)
}

/// Whether a statement failed on a unique constraint (an idempotency key
/// that already exists).
pub(crate) fn is_unique_violation(e: &sqlx::Error) -> bool {
    e.as_database_error().is_some_and(|d| d.code().as_deref() == Some("23505"))
}

const FLUSH: &str = "select pg_logical_emit_message(true, 'mesh-audit', $1), pg_notify($2, $1)";

/// Makes every transaction committed before it durable, then tells Tail
/// listeners on `channel` that the chain reaches `last`.
///
/// A transactional logical message is the smallest thing that writes WAL
/// under a transaction id, so its COMMIT is synchronous (per the server's
/// `synchronous_commit`) and flushes the WAL through its own commit record,
/// which lies after every earlier commit record. The NOTIFY is delivered
/// only once that commit is done: listeners never hear of an event before
/// it is durable. (On a server without `wal_level = logical` the message is
/// inert WAL that replicas and decoders skip.)
pub(crate) async fn flush(
    conn: &mut PgConnection,
    server: &PgConnectOptions,
    channel: &str,
    last: Option<u64>,
) -> Result<(), sqlx::Error> {
    let last = last.map_or_else(String::new, |s| s.to_string());
    sqlx::query(FLUSH)
        .bind(&last)
        .bind(channel)
        .execute(conn)
        .instrument(span_for(server, "SELECT", "pg_logical_emit_message", FLUSH))
        .await?;
    Ok(())
}

/// The chain head as of a moment when everything up to it is durable, for
/// Tail to announce: read, then, only if it is past `known` (so an idle
/// instance writes no WAL), flushed.
pub(crate) async fn durable_head(pool: &PgPool, known: u64) -> Result<Head, sqlx::Error> {
    let head = read_head(pool).await?;
    if head.last() > known {
        flush_only(pool).await?;
    }
    Ok(head)
}

const FLUSH_ONLY: &str = "select pg_logical_emit_message(true, 'mesh-audit', '')";

async fn flush_only(pool: &PgPool) -> Result<(), sqlx::Error> {
    // (the pool's connections commit synchronously)
    sqlx::query(FLUSH_ONLY)
        .execute(pool)
        .instrument(span_on(pool, "SELECT", "pg_logical_emit_message", FLUSH_ONLY))
        .await?;
    Ok(())
}

/// Whether an insert failed because no partition covers its recorded_at.
pub(crate) fn is_missing_partition(e: &sqlx::Error) -> bool {
    e.as_database_error()
        .is_some_and(|d| d.code().as_deref() == Some("23514") && d.message().contains("no partition"))
}

const ENSURE_PARTITION: &str = "select audit_ensure_partition($1)";

/// Creates the monthly partition holding `at` unless it exists.
pub(crate) async fn ensure_partition(
    conn: &mut PgConnection,
    server: &PgConnectOptions,
    at: DateTime<Utc>,
) -> Result<String, sqlx::Error> {
    sqlx::query_scalar(ENSURE_PARTITION)
        .bind(at)
        .fetch_one(conn)
        .instrument(span_for(server, "SELECT", "audit_partitions", ENSURE_PARTITION))
        .await
}

const DROP_BEFORE: &str =
    "select dropped, dropped_events, dropped_through from audit_drop_partitions_before($1)";

/// One partition retention removed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dropped {
    /// The partition's table.
    pub partition: String,
    /// How many events it held.
    pub events: u64,
    /// Its last sequence (the checkpoint), if it held any.
    pub through: Option<u64>,
}

/// Drops every partition ending at or before `cutoff` (owner only).
pub(crate) async fn drop_partitions_before(
    pool: &PgPool,
    cutoff: DateTime<Utc>,
) -> Result<Vec<Dropped>, sqlx::Error> {
    let rows: Vec<(String, Option<i64>, Option<i64>)> = sqlx::query_as(DROP_BEFORE)
        .bind(cutoff)
        .fetch_all(pool)
        .instrument(span_on(pool, "SELECT", "audit_partitions", DROP_BEFORE))
        .await?;
    Ok(rows
        .into_iter()
        .map(|(partition, events, through)| Dropped {
            partition,
            events: events.unwrap_or(0) as u64,
            through: through.map(|t| t as u64),
        })
        .collect())
}

const LATEST_CHECKPOINT: &str =
    "select last_sequence, last_hash from audit_checkpoints order by last_sequence desc limit 1";

/// The newest retention checkpoint: the last dropped sequence and its hash.
pub(crate) async fn latest_checkpoint(
    conn: &mut PgConnection,
    server: &PgConnectOptions,
) -> Result<Option<(u64, Vec<u8>)>, sqlx::Error> {
    let row: Option<(i64, Vec<u8>)> = sqlx::query_as(LATEST_CHECKPOINT)
        .fetch_optional(conn)
        .instrument(span_for(server, "SELECT", "audit_checkpoints", LATEST_CHECKPOINT))
        .await?;
    Ok(row.map(|(s, h)| (s as u64, h)))
}

const HASH_AT: &str = "select hash from audit_events where sequence = $1";

/// The stored hash of one event, if it is there.
pub(crate) async fn hash_at(
    conn: &mut PgConnection,
    server: &PgConnectOptions,
    sequence: u64,
) -> Result<Option<Vec<u8>>, sqlx::Error> {
    sqlx::query_scalar(HASH_AT)
        .bind(sequence as i64)
        .fetch_optional(conn)
        .instrument(span_for(server, "SELECT", "audit_events", HASH_AT))
        .await
}

const HASHES_AT: &str = "select sequence, hash from audit_events where sequence = any($1)";

/// The stored hashes of the events at `sequences` that exist, by sequence.
pub(crate) async fn hashes_at(
    pool: &PgPool,
    sequences: &[u64],
) -> Result<HashMap<u64, Vec<u8>>, sqlx::Error> {
    let wanted: Vec<i64> = sequences.iter().map(|s| *s as i64).collect();
    let rows: Vec<(i64, Vec<u8>)> = sqlx::query_as(HASHES_AT)
        .bind(wanted)
        .fetch_all(pool)
        .instrument(span_on(pool, "SELECT", "audit_events", HASHES_AT))
        .await?;
    Ok(rows.into_iter().map(|(s, h)| (s as u64, h)).collect())
}

const ROWS_FROM: &str = "select sequence, id, occurred_at, recorded_at, actor_type, actor_id, action, \
     resource_type, resource_id, outcome, source_ip, source_user_agent, source_service, request_id, trace_id, \
     hash_version, metadata::text as metadata_json, metadata_pb, prev_hash, hash \
     from audit_events where sequence >= $1 and sequence <= $2 order by sequence limit $3";

/// Raw rows with `from <= sequence <= to`, in sequence order (for Verify,
/// which must see rows that no longer decode).
pub(crate) async fn rows_from(
    conn: &mut PgConnection,
    server: &PgConnectOptions,
    from: u64,
    to: u64,
    limit: usize,
) -> Result<Vec<Row>, sqlx::Error> {
    sqlx::query_as(ROWS_FROM)
        .bind(from as i64)
        .bind(to as i64)
        .bind(limit as i64)
        .fetch_all(conn)
        .instrument(span_for(server, "SELECT", "audit_events", ROWS_FROM))
        .await
}

/// A statement whose WHERE clause depends on which filter fields are set:
/// built once per (kind, shape) and kept for the life of the process (at
/// most 2 × 2⁸ small strings), so it has a `&'static` text for spans and is
/// a stable prepared statement.
fn shaped(key: u32, build: impl FnOnce() -> String) -> &'static str {
    static CACHE: OnceLock<Mutex<HashMap<u32, &'static str>>> = OnceLock::new();
    let mut cache = CACHE.get_or_init(Default::default).lock().expect("statement cache lock");
    cache.entry(key).or_insert_with(|| Box::leak(build().into_boxed_str()))
}

/// Bit per set filter field, in [`filter_sql`] order.
fn filter_shape(f: &Filter) -> u32 {
    [
        f.actor_id.is_some(),
        f.action.is_some(),
        f.resource_type.is_some(),
        f.resource_id.is_some(),
        f.outcome.is_some(),
        f.since.is_some(),
        f.until.is_some(),
    ]
    .iter()
    .enumerate()
    .fold(0, |acc, (i, set)| acc | (u32::from(*set) << i))
}

/// ` and <column> <op> $n` for each set field, numbering from `*n + 1`.
fn filter_sql(f: &Filter, sql: &mut String, n: &mut usize) {
    let conds = [
        (f.actor_id.is_some(), "actor_id ="),
        (f.action.is_some(), "action ="),
        (f.resource_type.is_some(), "resource_type ="),
        (f.resource_id.is_some(), "resource_id ="),
        (f.outcome.is_some(), "outcome ="),
        (f.since.is_some(), "occurred_at >="),
        (f.until.is_some(), "occurred_at <"),
    ];
    for (set, cond) in conds {
        if set {
            *n += 1;
            sql.push_str(&format!(" and {cond} ${n}"));
        }
    }
}

type EventQuery<'q> = QueryAs<'q, Postgres, Row, PgArguments>;

fn bind_filter<'q>(mut q: EventQuery<'q>, f: &'q Filter) -> EventQuery<'q> {
    for s in [&f.actor_id, &f.action, &f.resource_type, &f.resource_id].into_iter().flatten() {
        q = q.bind(s.as_str());
    }
    if let Some(o) = f.outcome {
        q = q.bind(i16::from(o.code()));
    }
    for t in [f.since, f.until].into_iter().flatten() {
        q = q.bind(t);
    }
    q
}

/// One Query page, newest first: `(occurred_at, sequence)` descending,
/// strictly after `after`. Served by the index that leads with the filter's
/// most selective column and ends in `(occurred_at, sequence)`.
pub(crate) async fn query_page(
    pool: &PgPool,
    filter: &Filter,
    after: Option<PageToken>,
    limit: usize,
) -> Result<Vec<Event>, Error> {
    let shape = filter_shape(filter) | (u32::from(after.is_some()) << 7);
    let sql = shaped(shape, || {
        let mut sql = format!("select {COLUMNS} from audit_events where true");
        let mut n = 0;
        filter_sql(filter, &mut sql, &mut n);
        if after.is_some() {
            sql.push_str(&format!(" and (occurred_at, sequence) < (${}, ${})", n + 1, n + 2));
            n += 2;
        }
        sql.push_str(&format!(" order by occurred_at desc, sequence desc limit ${}", n + 1));
        sql
    });
    let mut q = bind_filter(sqlx::query_as(sql), filter);
    if let Some(a) = after {
        q = q.bind(a.occurred_at).bind(a.sequence as i64);
    }
    let rows =
        q.bind(limit as i64).fetch_all(pool).instrument(span_on(pool, "SELECT", "audit_events", sql)).await?;
    rows_to_events(rows)
}

/// Events with `after < sequence <= upto` that match `filter`, in sequence
/// order, at most `limit` (Tail replay and Export).
pub(crate) async fn range_page(
    pool: &PgPool,
    filter: &Filter,
    after: u64,
    upto: u64,
    limit: usize,
) -> Result<Vec<Event>, Error> {
    let shape = filter_shape(filter) | (1 << 8);
    let sql = shaped(shape, || {
        let mut sql = format!("select {COLUMNS} from audit_events where sequence > $1 and sequence <= $2");
        let mut n = 2;
        filter_sql(filter, &mut sql, &mut n);
        sql.push_str(&format!(" order by sequence limit ${}", n + 1));
        sql
    });
    let q = sqlx::query_as(sql).bind(after as i64).bind(upto as i64);
    let rows = bind_filter(q, filter)
        .bind(limit as i64)
        .fetch_all(pool)
        .instrument(span_on(pool, "SELECT", "audit_events", sql))
        .await?;
    rows_to_events(rows)
}

/// A pool that can read every event up to `upto`: a healthy replica whose
/// chain head has reached it, else the primary. (Sequences are gapless and
/// the head commits with its events, so one head read settles it.)
pub(crate) async fn covering(db: &mesh_db::Db, upto: u64) -> Result<PgPool, sqlx::Error> {
    let reader = db.reader();
    if reader.served_by == mesh_db::ServedBy::Primary {
        return Ok(reader.pool);
    }
    match read_head(&reader.pool).await {
        Ok(h) if h.last() >= upto => Ok(reader.pool),
        _ => Ok(db.primary().clone()),
    }
}
