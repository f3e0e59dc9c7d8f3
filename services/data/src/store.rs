//! The SQL: writes through `data_write` (migrations/0002), reads routed by
//! `mesh_db::Db::read`.
//!
//! Every write is one statement (the function call) in its own implicit
//! transaction, followed by a read of the primary's WAL position for the
//! consistency token. A caller that disconnects or times out can therefore
//! never leave a pooled connection inside a transaction: the server commits
//! or rolls back the statement by itself, and sqlx discards the unread
//! response before the connection is used again. (A transaction opened
//! with `begin()` and abandoned mid-flight is exactly what sqlx cannot
//! clean up reliably.)

use chrono::{DateTime, Utc};
use mesh_db::{Db, Lsn, Read};
use mesh_proto::data::Document as PbDocument;
use tracing::Instrument as _;

use crate::{
    document,
    error::{Conflict, Error},
    request::{Collection, Get, Op, Query, Write},
};

const WRITE: &str = "select failed_op, actual_version, versions, outbox_ids, written_at \
     from data_write($1, $2, $3, $4::jsonb[], $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)";

const GET: &str = "select body, version, updated_at from documents where collection = $1 and key = $2";

/// Documents of a page, in key order, with the bytes up to and including
/// each; only rows that start under the page's byte budget come back.
/// `octet_length` of a TOASTed body reads its header, not the value.
const QUERY_ALL: &str = "select key, body, version, updated_at, upto from ( \
       select key, body, version, updated_at, sum(octet_length(body)) over (order by key) as upto \
       from documents where collection = $1 and key > $2 order by key limit $3) p \
     where upto - octet_length(body) < $4 order by key";

const QUERY_FILTER: &str = "select key, body, version, updated_at, upto from ( \
       select key, body, version, updated_at, sum(octet_length(body)) over (order by key) as upto \
       from documents where collection = $1 and key > $2 and document @> $5::jsonb order by key limit $3) p \
     where upto - octet_length(body) < $4 order by key";

/// Most document bytes in one Query page: with keys and framing the
/// response stays under gRPC's usual 4 MiB message limit. A page holds at
/// least one document (at most 1 MiB), so a page always makes progress.
pub(crate) const MAX_PAGE_BYTES: i64 = 3 << 20;

/// Deadlocks between concurrent writes are retried this many times.
const DEADLOCK_RETRIES: usize = 3;

/// Who wrote, for the audit events written with the change (also read back
/// from the outbox row, whose columns have these names).
#[derive(Debug, Clone, sqlx::FromRow)]
pub(crate) struct Origin {
    pub(crate) actor_id: String,
    pub(crate) session_id: String,
    pub(crate) request_id: String,
    pub(crate) trace_id: String,
    pub(crate) traceparent: String,
    pub(crate) source_ip: String,
    pub(crate) user_agent: String,
}

/// A committed write.
#[derive(Debug, Clone)]
pub(crate) struct Written {
    /// Per operation: the version written; for a delete, the version
    /// deleted (`None`: there was nothing to delete).
    pub(crate) versions: Vec<Option<u64>>,
    /// Per operation: its outbox event (`None`: a delete that found nothing).
    pub(crate) outbox: Vec<Option<i64>>,
    /// When (the documents' `updated_at`, the events' `occurred_at`).
    pub(crate) at: DateTime<Utc>,
    /// The consistency token's position.
    pub(crate) lsn: Lsn,
}

type WriteRow = (Option<i32>, Option<i64>, Option<Vec<Option<i64>>>, Option<Vec<Option<i64>>>, DateTime<Utc>);

/// Applies `writes` in order, all or nothing; the event of `writes[i]`
/// gets idempotency key `idempotency[i]`. `grace`: how long the outbox
/// events are left to this instance before any sweep may take them.
pub(crate) async fn write(
    db: &Db,
    writes: &[Write],
    idempotency: &[uuid::Uuid],
    origin: &Origin,
    grace: std::time::Duration,
    batch: bool,
) -> Result<Written, Error> {
    let n = writes.len();
    let mut delete = Vec::with_capacity(n);
    let (mut collections, mut keys) = (Vec::with_capacity(n), Vec::with_capacity(n));
    let (mut documents, mut bodies, mut expected) =
        (Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n));
    for w in writes {
        collections.push(w.collection.as_str());
        keys.push(w.key.as_str());
        expected.push(w.expected.map(|v| v as i64));
        match &w.op {
            Op::Put(d) => {
                delete.push(false);
                documents.push(Some(d.json.as_str()));
                bodies.push(Some(d.body.as_slice()));
            }
            Op::Delete => {
                delete.push(true);
                documents.push(None);
                bodies.push(None);
            }
        }
    }
    let grace = sqlx::postgres::types::PgInterval::try_from(grace).unwrap_or_default();
    let mut conn = db.write().await?;
    let mut attempt = 0;
    let row: WriteRow = loop {
        let span = conn.span("SELECT", "documents", WRITE);
        let r = sqlx::query_as(WRITE)
            .bind(&delete)
            .bind(&collections)
            .bind(&keys)
            .bind(&documents)
            .bind(&bodies)
            .bind(&expected)
            .bind(idempotency)
            .bind(&origin.actor_id)
            .bind(&origin.session_id)
            .bind(&origin.request_id)
            .bind(&origin.trace_id)
            .bind(&origin.traceparent)
            .bind(&origin.source_ip)
            .bind(&origin.user_agent)
            .bind(grace)
            .fetch_one(&mut *conn)
            .instrument(span)
            .await;
        match r {
            Err(sqlx::Error::Database(e))
                if e.code().as_deref() == Some("40P01") && attempt < DEADLOCK_RETRIES =>
            {
                attempt += 1;
                tracing::debug!(attempt, "write deadlocked with another, retrying");
            }
            r => break r?,
        }
    };
    let (failed, actual, versions, outbox, at) = row;
    if let Some(i) = failed {
        let w = &writes[i as usize];
        return Err(Error::Conflict(Conflict {
            op: batch.then_some(i as usize),
            collection: w.collection.as_str().to_owned(),
            key: w.key.as_str().to_owned(),
            expected: w.expected.unwrap_or_default(),
            actual: actual.map(|v| v as u64),
        }));
    }
    let span = conn.span("SELECT", "pg_current_wal_insert_lsn", "select pg_current_wal_insert_lsn()");
    let lsn = match Db::current_lsn(&mut *conn).instrument(span).await {
        Ok(lsn) => lsn,
        // Committed: failing the call now would report a write that happened
        // as one that did not. Its token sends reads to the primary instead.
        Err(e) => {
            tracing::warn!(error = %e, "write committed but its WAL position is unknown; its token reads from the primary");
            Lsn::PRIMARY
        }
    };
    Ok(Written {
        versions: versions.unwrap_or_default().into_iter().map(|v| v.map(|v| v as u64)).collect(),
        outbox: outbox.unwrap_or_default(),
        at,
        lsn,
    })
}

/// A document as read.
#[derive(Debug, Clone)]
pub(crate) struct Found {
    pub(crate) document: prost_types::Struct,
    pub(crate) version: u64,
    pub(crate) updated_at: DateTime<Utc>,
}

fn decode(body: &[u8]) -> Result<prost_types::Struct, sqlx::Error> {
    document::decode(body).map_err(|e| sqlx::Error::Decode(Box::new(e)))
}

/// Reads one document (`None`: it does not exist) and where it was read.
pub(crate) async fn get(db: &Db, g: &Get) -> Result<Read<Option<Found>>, Error> {
    let (collection, key) = (g.collection.as_str(), g.key.as_str());
    let read = db
        .read(g.at, |conn| {
            // Owned: the closure may run twice (a failed replica, then the primary).
            let (collection, key) = (collection.to_owned(), key.to_owned());
            Box::pin(async move {
                let span = conn.span("SELECT", "documents", GET);
                let row: Option<(Vec<u8>, i64, DateTime<Utc>)> = sqlx::query_as(GET)
                    .bind(collection)
                    .bind(key)
                    .fetch_optional(&mut **conn)
                    .instrument(span)
                    .await?;
                row.map(|(body, version, updated_at)| {
                    Ok(Found { document: decode(&body)?, version: version as u64, updated_at })
                })
                .transpose()
            })
        })
        .await?;
    Ok(read)
}

/// One page of a Query: up to `page_size` documents, and the last key when
/// more may follow.
pub(crate) async fn query(db: &Db, q: &Query) -> Result<Read<(Vec<PbDocument>, Option<String>)>, Error> {
    let read = db
        .read(q.at, |conn| {
            // Owned: the closure may run twice (a failed replica, then the primary).
            let (collection, after, filter) = (q.collection.clone(), q.after.clone(), q.filter.clone());
            let page_size = q.page_size;
            Box::pin(async move {
                let after = after.unwrap_or_default();
                // One more than asked: whether another page follows.
                let limit = page_size as i64 + 1;
                let span =
                    conn.span("SELECT", "documents", if filter.is_some() { QUERY_FILTER } else { QUERY_ALL });
                let query = sqlx::query_as(if filter.is_some() { QUERY_FILTER } else { QUERY_ALL })
                    .bind(collection.as_str())
                    .bind(after)
                    .bind(limit)
                    .bind(MAX_PAGE_BYTES);
                let rows: Vec<Row> = match filter {
                    None => query.fetch_all(&mut **conn).instrument(span).await?,
                    // Planned for its own values each time (not as a prepared
                    // statement's generic plan), so a filter that matches much
                    // of the collection walks the key order and a selective one
                    // uses the GIN index.
                    Some(filter) => {
                        query.bind(filter).persistent(false).fetch_all(&mut **conn).instrument(span).await?
                    }
                };
                page(&collection, rows, page_size)
            })
        })
        .await?;
    Ok(read)
}

/// A Query row: key, body, version, updated_at, bytes up to and including it.
type Row = (String, Vec<u8>, i64, DateTime<Utc>, i64);

/// The page out of `rows` (at most `page_size` + 1 of them): up to
/// `page_size` documents within [`MAX_PAGE_BYTES`] (the first always), and
/// the last key when more follow.
fn page(
    collection: &Collection,
    rows: Vec<Row>,
    page_size: usize,
) -> Result<(Vec<PbDocument>, Option<String>), sqlx::Error> {
    let total = rows.len();
    let mut docs = Vec::with_capacity(total.min(page_size));
    for (i, (key, body, version, updated_at, upto)) in rows.into_iter().enumerate() {
        if i == page_size || (i > 0 && upto > MAX_PAGE_BYTES) {
            break;
        }
        docs.push(PbDocument {
            collection: collection.as_str().to_owned(),
            key,
            document: Some(decode(&body)?),
            version: version as u64,
            updated_at: Some(timestamp(updated_at)),
        });
    }
    let last = (docs.len() < total).then(|| docs.last().map(|d| d.key.clone())).flatten();
    Ok((docs, last))
}

/// A protobuf timestamp.
pub(crate) fn timestamp(t: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp { seconds: t.timestamp(), nanos: t.timestamp_subsec_nanos() as i32 }
}
