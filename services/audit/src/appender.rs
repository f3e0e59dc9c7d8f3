//! Group commit. Append calls queue their validated events; one task per
//! instance takes whatever is queued (at most `batch_max`, waiting up to
//! `batch_linger` for more) and writes it as one batch:
//!
//! - **The exact path.** In a transaction: lock the chain head row (batches
//!   of every instance take turns here); read the head and look up the
//!   batch's idempotency keys (under the lock, every earlier append of the
//!   same key has committed and is visible); give each new event the next
//!   sequence, `recorded_at` (never earlier than the head's) and its hash,
//!   linked to the previous one; insert events, keys and the new head with
//!   one statement; commit.
//! - **The fast path.** The task remembers the head its last batch left. If
//!   nothing suggests another instance has written since, it seals the batch
//!   on that head before touching the database and sends one autocommit
//!   statement that advances the head row only if it still is that head,
//!   and inserts only if it did. A moved head or an existing key writes
//!   nothing and falls back to the exact path. One round trip per batch, and
//!   the head row is held only while that statement runs.
//!
//! Both commit with `synchronous_commit = off` (the batch task has a
//! connection of its own for that): the commit record is in the WAL and the
//! head row is free again, but the WAL flush is not awaited. A second task,
//! the flusher, makes every batch committed so far durable with one
//! synchronous commit of its own (WAL is flushed in order, so that flush
//! covers all earlier commit records), NOTIFYs Tail listeners, and only then
//! answers the callers.
//!
//! Why: PostgreSQL releases row locks only after a synchronous commit's
//! fsync, so chaining on a locked row with synchronous commits would allow
//! one batch per fsync. This way the serial part is one round trip, and one
//! fsync covers every batch committed while the previous one was flushing.
//! While a batch is written, the next one fills, so batches grow with load
//! on their own and a lone append waits for no timer.
//!
//! An event is visible on the primary (not on replicas, which only receive
//! flushed WAL, nor to Tail) a moment before it is durable; if PostgreSQL
//! crashes in that moment it is lost, and so is every later one, with
//! nobody told it was recorded: the caller gets an error and retries with
//! its idempotency key.

use std::{collections::HashMap, sync::Arc, time::Instant};

use chrono::{DateTime, Datelike as _, Utc};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};
use sqlx::{Connection as _, PgConnection, PgPool, postgres::PgConnectOptions};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tracing::Instrument as _;
use uuid::Uuid;

use crate::{
    chain::{Event, Hash},
    config::{AuditConfig, Clock},
    domain::AppendCommand,
    error::{Error, is_connection_error},
    store::{self, FirstResult, Head, NewKey},
};

/// What an Append is answered with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Appended {
    /// Event id.
    pub(crate) id: Uuid,
    /// Sequence.
    pub(crate) sequence: u64,
    /// Hash.
    pub(crate) hash: Hash,
    /// True when an earlier append with the same key made the event.
    pub(crate) deduplicated: bool,
}

impl From<FirstResult> for Appended {
    fn from(r: FirstResult) -> Self {
        Self { id: r.id, sequence: r.sequence, hash: r.hash, deduplicated: true }
    }
}

/// An idempotency key sent again with a different event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct KeyReused {
    first_sequence: u64,
}

impl From<KeyReused> for Error {
    fn from(r: KeyReused) -> Self {
        Error::KeyReused { first_sequence: r.first_sequence }
    }
}

/// What one append of a batch is answered with once the batch is durable.
type Answer = Result<Appended, KeyReused>;

/// The way back to a caller, holding its place among the appends in
/// flight until it is answered (or the caller is gone).
struct Reply {
    tx: oneshot::Sender<Result<Appended, Error>>,
    _slot: OwnedSemaphorePermit,
}

impl Reply {
    fn send(self, r: Result<Appended, Error>) {
        let _ = self.tx.send(r);
    }

    fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }
}

struct Pending {
    command: AppendCommand,
    reply: Reply,
    /// The caller's span, linked from the batch's span.
    span: tracing::Span,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

#[derive(Debug, Clone)]
struct Metrics {
    appends: Family<ResultLabels, Counter>,
    batch_size: Histogram,
    batch_seconds: Histogram,
    flush_seconds: Histogram,
    queued: Gauge,
}

impl Metrics {
    fn register(registry: &mut Registry) -> Self {
        let m = Self {
            appends: Family::default(),
            batch_size: Histogram::new([1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0]),
            batch_seconds: Histogram::new(mesh_runtime::latency_buckets()),
            flush_seconds: Histogram::new(mesh_runtime::latency_buckets()),
            queued: Gauge::default(),
        };
        // Every result at 0 from the start: alerts on failures read 0, not "no data".
        for result in ["committed", "deduplicated", "key_reused", "failed", "refused"] {
            let _ = m.appends.get_or_create(&ResultLabels { result });
        }
        registry.register(
            "mesh_audit_appends",
            "Appends by result: committed, deduplicated, key_reused (refused: the key was used for another \
             event), failed, refused (queue full)",
            m.appends.clone(),
        );
        registry.register("mesh_audit_batch_size", "Events per group commit", m.batch_size.clone());
        registry.register(
            "mesh_audit_batch_seconds",
            "Time to sequence, write and commit one batch (the part serialised across instances)",
            m.batch_seconds.clone(),
        );
        registry.register(
            "mesh_audit_flush_seconds",
            "Time of one WAL flush making committed batches durable",
            m.flush_seconds.clone(),
        );
        registry.register("mesh_audit_append_queue", "Appends waiting for a batch", m.queued.clone());
        m
    }

    fn count(&self, result: &'static str, n: usize) {
        self.appends.get_or_create(&ResultLabels { result }).inc_by(n as u64);
    }
}

/// The handle Append calls use; the batch task ends when every handle is gone.
#[derive(Debug, Clone)]
pub(crate) struct Appender {
    tx: mpsc::Sender<Pending>,
    /// One permit per append accepted and not yet answered.
    slots: Arc<Semaphore>,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Pending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pending").finish_non_exhaustive()
    }
}

impl Appender {
    /// Starts the batch and flush tasks, writing through connections of
    /// their own made like `pool`'s and notifying `channel`.
    ///
    /// They run on a thread of their own with its own runtime: every batch
    /// of every caller goes through them in turn, so their round trips must
    /// not wait in the queue of tasks serving gRPC calls.
    pub(crate) fn start(
        pool: &PgPool,
        config: &AuditConfig,
        channel: String,
        registry: &mut Registry,
    ) -> Self {
        // Every append holds a slot from acceptance to its answer, so the
        // appends in flight (queued, being written, waiting for the flush)
        // never exceed `queue_capacity`; each channel below holds at most
        // that many appends, so neither fills before the slots run out.
        let slots = Arc::new(Semaphore::new(config.queue_capacity));
        let (tx, rx) = mpsc::channel(config.queue_capacity);
        let metrics = Arc::new(Metrics::register(registry));
        let (flush_tx, flush_rx) = mpsc::channel(config.queue_capacity);
        let options = (*pool.connect_options()).clone();
        let batcher = Batcher {
            options: options.clone(),
            conn: None,
            idle_since: Instant::now(),
            head: None,
            last_written: None,
            rx,
            flush: flush_tx,
            max: config.batch_max,
            linger: config.batch_linger,
            clock: config.clock.clone(),
            metrics: metrics.clone(),
            partitions: Vec::new(),
        };
        let flusher = flusher(options, channel, flush_rx, metrics.clone());
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build();
        let spawned = runtime.and_then(|rt| {
            std::thread::Builder::new().name("audit-writer".into()).spawn(move || {
                rt.block_on(async move { futures::join!(batcher.run(), flusher) });
            })
        });
        if let Err(e) = spawned {
            // Only if the OS refuses a thread; appends then fail with UNAVAILABLE.
            tracing::error!(error = %e, "cannot start the audit writer thread");
        }
        Self { tx, slots, metrics }
    }

    /// Queues `command` and waits until its batch is committed (or failed).
    pub(crate) async fn append(&self, command: AppendCommand) -> Result<Appended, Error> {
        let Ok(slot) = self.slots.clone().try_acquire_owned() else {
            self.metrics.count("refused", 1);
            return Err(Error::Overloaded);
        };
        let (tx, answer) = oneshot::channel();
        let reply = Reply { tx, _slot: slot };
        let pending = Pending { command, reply, span: tracing::Span::current() };
        match self.tx.try_send(pending) {
            Ok(()) => self.metrics.queued.inc(),
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.metrics.count("refused", 1);
                return Err(Error::Overloaded);
            }
            Err(mpsc::error::TrySendError::Closed(_)) => return Err(Error::ShuttingDown),
        };
        answer.await.map_err(|_| Error::ShuttingDown)?
    }
}

struct Batcher {
    /// How to connect (the service's pool settings).
    options: PgConnectOptions,
    /// The batch task's own connection (asynchronous commits); made on demand.
    conn: Option<PgConnection>,
    /// When `conn` was last used (a connection idle for a while is pinged
    /// before use: a server restart may have closed it meanwhile).
    idle_since: Instant,
    /// The head the last batch of this task left, if it is worth trying the
    /// fast path on (no sign of another writer since).
    head: Option<Head>,
    /// The head this task's last batch left.
    last_written: Option<Head>,
    rx: mpsc::Receiver<Pending>,
    /// Committed batches waiting to be made durable and answered.
    flush: mpsc::Sender<Committed>,
    max: usize,
    linger: std::time::Duration,
    clock: Clock,
    metrics: Arc<Metrics>,
    /// Months whose partition is known to exist.
    partitions: Vec<(i32, u32)>,
}

fn month_of(t: DateTime<Utc>) -> (i32, u32) {
    (t.year(), t.month())
}

fn micros(t: DateTime<Utc>) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(t.timestamp_micros()).expect("in range")
}

/// A batch sealed on a head: what to write and what to answer.
struct Plan<'a> {
    events: Vec<Event>,
    keys: Vec<NewKey<'a>>,
    answers: Vec<Answer>,
    /// The head after it.
    head: Head,
}

impl<'a> Plan<'a> {
    /// Seals `batch` on `head`: answers known keys with their first result
    /// (or, sent with another event, refuses them), repeats within the
    /// batch likewise with the first occurrence's, and gives the rest
    /// consecutive sequences and linked hashes.
    fn seal(
        batch: &'a [Pending],
        head: &Head,
        now: DateTime<Utc>,
        known: &HashMap<(String, String), FirstResult>,
    ) -> Self {
        // Never earlier than the head: recorded_at is non-decreasing along
        // the chain even when instances' clocks disagree, which keeps each
        // monthly partition a contiguous run of sequences.
        let recorded_at = head.recorded_at.map_or(now, |h| h.max(now));
        let mut plan = Plan {
            events: Vec::with_capacity(batch.len()),
            keys: Vec::new(),
            answers: Vec::with_capacity(batch.len()),
            head: *head,
        };
        let mut in_batch: HashMap<(&str, &str), (Appended, [u8; 32])> = HashMap::new();
        for p in batch {
            let service = p.command.event.source_service.as_str();
            let fingerprint = p.command.fingerprint;
            if let Some(key) = p.command.idempotency_key.as_deref() {
                if let Some(first) = known.get(&(service.to_owned(), key.to_owned())) {
                    // (a key kept before fingerprints were: any resend gets its first result)
                    plan.answers.push(match first.request_hash {
                        Some(h) if h != fingerprint => Err(KeyReused { first_sequence: first.sequence }),
                        _ => Ok((*first).into()),
                    });
                    continue;
                }
                if let Some(&(first, first_fingerprint)) = in_batch.get(&(service, key)) {
                    plan.answers.push(if first_fingerprint == fingerprint {
                        Ok(Appended { deduplicated: true, ..first })
                    } else {
                        Err(KeyReused { first_sequence: first.sequence })
                    });
                    continue;
                }
            }
            let sequence = plan.head.next_sequence;
            let mut event = p.command.event.clone().into_event(Uuid::now_v7(), sequence, recorded_at);
            event.seal(plan.head.hash);
            let appended = Appended { id: event.id, sequence, hash: event.hash, deduplicated: false };
            if let Some(key) = p.command.idempotency_key.as_deref() {
                plan.keys.push(NewKey {
                    source_service: service,
                    key,
                    id: event.id,
                    sequence,
                    hash: event.hash,
                    request_hash: fingerprint,
                });
                in_batch.insert((service, key), (appended, fingerprint));
            }
            plan.answers.push(Ok(appended));
            plan.head =
                Head { next_sequence: sequence + 1, hash: event.hash, recorded_at: Some(recorded_at) };
            plan.events.push(event);
        }
        plan
    }
}

impl Batcher {
    async fn run(mut self) {
        let mut batch = Vec::with_capacity(self.max);
        while let Some(first) = self.rx.recv().await {
            batch.push(first);
            self.fill(&mut batch).await;
            self.metrics.queued.dec_by(batch.len() as i64);
            // A caller that gave up (deadline, cancellation) before its batch
            // started was never acknowledged: leave its event out.
            batch.retain(|p| !p.reply.is_closed());
            if !batch.is_empty() {
                self.write(&mut batch).await;
            }
            batch.clear();
        }
        tracing::debug!("append queue closed, batch task done");
    }

    async fn fill(&mut self, batch: &mut Vec<Pending>) {
        while batch.len() < self.max {
            match self.rx.try_recv() {
                Ok(p) => batch.push(p),
                Err(_) => break,
            }
        }
        if self.linger.is_zero() || batch.len() >= self.max {
            return;
        }
        let deadline = tokio::time::Instant::now() + self.linger;
        while batch.len() < self.max {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(p)) => batch.push(p),
                Ok(None) | Err(_) => break,
            }
        }
    }

    /// Commits `batch` and hands it to the flusher (or answers its callers
    /// with the error).
    async fn write(&mut self, batch: &mut Vec<Pending>) {
        // A child of the first call it serves (so that call's trace goes on
        // into PostgreSQL), linked from every other one.
        let span = tracing::info_span!(
            parent: batch.first().and_then(|p| p.span.id()),
            "audit.batch",
            batch.size = batch.len(),
            batch.path = tracing::field::Empty,
            otel.status_code = tracing::field::Empty
        );
        for p in batch.iter().skip(1) {
            span.follows_from(&p.span);
        }
        let started = Instant::now();
        self.ensure_partition(self.clock.now()).await;
        let mut result = self.commit(batch).instrument(span.clone()).await;
        if let Err(BatchError::MissingPartition(at)) = &result {
            // recorded_at moved into a month nobody prepared (the head's
            // clock ran ahead of ours): make it, try once more
            let at = *at;
            self.partitions.clear();
            self.ensure_partition(at).await;
            result = self.commit(batch).instrument(span.clone()).await;
        }
        self.metrics.batch_seconds.observe(started.elapsed().as_secs_f64());
        match result {
            Ok(answers) => {
                self.metrics.batch_size.observe(batch.len() as f64);
                let last_sequence = answers
                    .iter()
                    .filter_map(|a| a.as_ref().ok())
                    .filter(|a| !a.deduplicated)
                    .map(|a| a.sequence)
                    .max();
                let replies = batch.drain(..).map(|p| p.reply).collect();
                // The flusher outlives the batcher (it drains its queue), so
                // this cannot fail; it waits only while the flusher is
                // behind by a whole queue's worth of appends.
                let _ = self.flush.send(Committed { replies, answers, last_sequence, span }).await;
            }
            Err(e) => {
                span.record("otel.status_code", "ERROR");
                self.metrics.count("failed", batch.len());
                let e = e.into_error();
                tracing::warn!(parent: &span, error = %e, events = batch.len(), "append batch failed");
                for p in batch.drain(..) {
                    p.reply.send(Err(e.duplicate()));
                }
            }
        }
    }

    /// Makes sure the partition for `at` (and the month after, so month
    /// boundaries never wait on DDL) exists, once per month per instance.
    async fn ensure_partition(&mut self, at: DateTime<Utc>) {
        if self.partitions.contains(&month_of(at)) {
            return;
        }
        let next = at.checked_add_months(chrono::Months::new(1)).unwrap_or(at);
        // (a copy: `connection` borrows all of `self`; this runs once a month)
        let server = self.options.clone();
        for t in [at, next] {
            let conn = match self.connection().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot prepare partition");
                    return;
                }
            };
            match store::ensure_partition(conn, &server, t).await {
                Ok(name) => {
                    tracing::debug!(partition = %name, "partition ready");
                    self.partitions.push(month_of(t));
                }
                Err(e) => {
                    if is_connection_error(&e) {
                        self.conn = None;
                    }
                    tracing::warn!(error = %e, "cannot prepare partition");
                }
            }
        }
    }

    /// The batch task's connection, made if needed.
    async fn connection(&mut self) -> Result<&mut PgConnection, sqlx::Error> {
        revive(&mut self.conn, &mut self.idle_since).await;
        if self.conn.is_none() {
            self.conn = Some(store::batch_connection(&self.options).await?);
        }
        Ok(self.conn.as_mut().expect("just made"))
    }

    /// Writes `batch` by the fast path if it may work, else (or if it did
    /// not) by the exact path. Keeps the connection unless it failed.
    async fn commit(&mut self, batch: &[Pending]) -> Result<Vec<Answer>, BatchError> {
        revive(&mut self.conn, &mut self.idle_since).await;
        let mut conn = match self.conn.take() {
            Some(c) => c,
            None => store::batch_connection(&self.options).await.map_err(BatchError::Begin)?,
        };
        let result = self.commit_on(&mut conn, batch).await;
        let broken = match &result {
            Err(
                BatchError::Begin(e)
                | BatchError::Statement(e)
                | BatchError::Unknown(e)
                | BatchError::Commit(e),
            ) => is_connection_error(e),
            _ => false,
        };
        if broken {
            self.head = None;
        } else {
            self.conn = Some(conn);
        }
        result
    }

    async fn commit_on(
        &mut self,
        conn: &mut PgConnection,
        batch: &[Pending],
    ) -> Result<Vec<Answer>, BatchError> {
        let now = micros(self.clock.now());
        if let Some(head) = self.head.take() {
            let plan = Plan::seal(batch, &head, now, &HashMap::new());
            tracing::Span::current().record("batch.path", "fast");
            match store::insert_batch(conn, &self.options, &plan.events, &plan.keys, &head).await {
                Ok(true) => {
                    self.head = Some(plan.head);
                    self.last_written = Some(plan.head);
                    return Ok(plan.answers);
                }
                // another instance wrote since: the exact path, and stay on it
                Ok(false) => tracing::debug!("chain head moved by another writer, taking the exact path"),
                // a key seen before: find its first result under the lock
                Err(e) if store::is_unique_violation(&e) => {
                    tracing::debug!("an idempotency key exists already, taking the exact path");
                }
                Err(e) if store::is_missing_partition(&e) => return Err(BatchError::MissingPartition(now)),
                // a single autocommit statement: if the connection broke, it may have committed
                Err(e) if is_connection_error(&e) => return Err(BatchError::Unknown(e)),
                Err(e) => return Err(BatchError::Statement(e)),
            }
        }

        tracing::Span::current().record("batch.path", "exact");
        let mut tx = store::begin_locked(conn, &self.options).await.map_err(BatchError::Begin)?;
        let keys: Vec<(&str, &str)> = batch
            .iter()
            .filter_map(|p| {
                Some((p.command.event.source_service.as_str(), p.command.idempotency_key.as_deref()?))
            })
            .collect();
        let (head, known) =
            store::head_and_keys(&mut tx, &self.options, &keys).await.map_err(BatchError::Statement)?;
        let plan = Plan::seal(batch, &head, now, &known);
        if !plan.events.is_empty() {
            match store::insert_batch(&mut tx, &self.options, &plan.events, &plan.keys, &head).await {
                Ok(true) => {}
                Ok(false) => {
                    return Err(BatchError::Statement(sqlx::Error::Protocol(
                        "chain head moved under its lock".into(),
                    )));
                }
                Err(e) if store::is_missing_partition(&e) => return Err(BatchError::MissingPartition(now)),
                Err(e) => return Err(BatchError::Statement(e)),
            }
        }
        tx.commit().await.map_err(BatchError::Commit)?;
        // Try the fast path next time only if nobody else wrote since our
        // last batch: with several writers it would mostly miss.
        let alone = self.last_written == Some(head);
        self.last_written = Some(plan.head);
        if alone {
            self.head = Some(plan.head);
        }
        Ok(plan.answers)
    }
}

/// A batch whose COMMIT returned but whose WAL may not be flushed yet.
struct Committed {
    replies: Vec<Reply>,
    answers: Vec<Answer>,
    /// The last sequence it wrote (none if every event was a duplicate).
    last_sequence: Option<u64>,
    span: tracing::Span,
}

/// Drops a held connection that idled long enough to be checked and does
/// not answer a ping (`mesh_db::alive_after_idle`): a primary restart closes
/// idle connections, and the next batch must not fail on one. Nothing was
/// sent on it, so nothing is repeated. Restarts the idle clock.
async fn revive(conn: &mut Option<PgConnection>, idle_since: &mut Instant) {
    if let Some(c) = conn.as_mut()
        && !mesh_db::alive_after_idle(c, idle_since.elapsed()).await
    {
        *conn = None;
    }
    *idle_since = Instant::now();
}

/// Makes committed batches durable, then answers their callers: one
/// synchronous commit (and so one WAL flush) for everything committed
/// since the previous one. Ends when the batcher is gone and all is answered.
async fn flusher(
    options: PgConnectOptions,
    channel: String,
    mut rx: mpsc::Receiver<Committed>,
    metrics: Arc<Metrics>,
) {
    let mut conn: Option<PgConnection> = None;
    let mut idle_since = Instant::now();
    let mut done = Vec::new();
    while let Some(first) = rx.recv().await {
        done.push(first);
        while let Ok(more) = rx.try_recv() {
            done.push(more);
        }
        let last = done.iter().filter_map(|c| c.last_sequence).max();
        // As a batch: a child of the first, linked from the others.
        let span = tracing::info_span!(
            parent: done.first().and_then(|c: &Committed| c.span.id()),
            "audit.flush",
            batches = done.len()
        );
        for c in done.iter().skip(1) {
            span.follows_from(&c.span);
        }
        let started = Instant::now();
        let flushed = async {
            revive(&mut conn, &mut idle_since).await;
            if conn.is_none() {
                conn = Some(PgConnection::connect_with(&options).await?);
            }
            let result = store::flush(conn.as_mut().expect("connected"), &options, &channel, last).await;
            if result.as_ref().is_err_and(is_connection_error) {
                conn = None;
            }
            result
        }
        .instrument(span.clone())
        .await;
        metrics.flush_seconds.observe(started.elapsed().as_secs_f64());
        match flushed {
            Ok(()) => {
                for c in done.drain(..) {
                    let dedup = c.answers.iter().filter(|a| a.is_ok_and(|a| a.deduplicated)).count();
                    let reused = c.answers.iter().filter(|a| a.is_err()).count();
                    metrics.count("committed", c.answers.len() - dedup - reused);
                    metrics.count("deduplicated", dedup);
                    metrics.count("key_reused", reused);
                    for (reply, answer) in c.replies.into_iter().zip(c.answers) {
                        reply.send(answer.map_err(Error::from));
                    }
                }
            }
            Err(e) => {
                // The batches are committed, but whether their WAL reached
                // the disk is unknown: the callers must retry with their keys.
                let error = Error::CommitUnknown(e.to_string());
                tracing::warn!(parent: &span, error = %e, batches = done.len(), "wal flush failed");
                for c in done.drain(..) {
                    metrics.count("failed", c.replies.len());
                    for reply in c.replies {
                        reply.send(Err(error.duplicate()));
                    }
                }
            }
        }
    }
}

enum BatchError {
    /// Failed before anything was sent: nothing committed.
    Begin(sqlx::Error),
    /// A statement failed: the transaction rolls back, nothing committed.
    Statement(sqlx::Error),
    /// The connection broke during the fast path's autocommit statement:
    /// the outcome is unknown.
    Unknown(sqlx::Error),
    /// No partition for this recorded_at.
    MissingPartition(DateTime<Utc>),
    /// COMMIT failed: if the connection broke, the outcome is unknown.
    /// (It returning does not make the batch durable: the flusher does.)
    Commit(sqlx::Error),
}

impl BatchError {
    /// What every caller of the failed batch is told; only variants that can
    /// be repeated for each of them.
    fn into_error(self) -> Error {
        match self {
            Self::Begin(e) | Self::Statement(e) if is_connection_error(&e) || is_timeout(&e) => {
                Error::Unavailable(e.to_string())
            }
            Self::Begin(e) | Self::Statement(e) => {
                tracing::error!(error = %e, "append batch refused by the database");
                Error::Internal("append batch refused by the database".into())
            }
            Self::MissingPartition(at) => Error::Unavailable(format!("no partition for recorded_at {at}")),
            Self::Unknown(e) => Error::CommitUnknown(e.to_string()),
            Self::Commit(e) if is_connection_error(&e) => Error::CommitUnknown(e.to_string()),
            Self::Commit(e) => Error::Unavailable(format!("commit failed: {e}")),
        }
    }
}

fn is_timeout(e: &sqlx::Error) -> bool {
    e.as_database_error().and_then(|d| d.code()).as_deref() == Some("57014")
}

impl Error {
    /// The same error for another caller of the batch.
    fn duplicate(&self) -> Self {
        match self {
            Self::Unavailable(m) => Self::Unavailable(m.clone()),
            Self::CommitUnknown(m) => Self::CommitUnknown(m.clone()),
            Self::Internal(m) => Self::Internal(m.clone()),
            other => Self::Internal(other.to_string()),
        }
    }
}
