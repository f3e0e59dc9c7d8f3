//! Sessions in the Redis Cluster.
//!
//! Every key of a user lives in their bucket's slot (see `token` and the
//! key table in `lua/common.lua`), so every operation is one `EVALSHA` of a
//! script that does all of it atomically: validation and touch, create with
//! cap eviction, rotation, revocation by id, token or user, listing, and the
//! outbox scripts. Each script that changes a session also appends the
//! audit events of the change to the bucket's outbox and publishes revoked
//! token hashes on the bucket's channel, in the same atomic step.
//!
//! # Durability
//! Redis replicates asynchronously: a master that dies right after
//! acknowledging a write can take it along in the failover. So after every
//! change (create, refresh, revoke, revoke-all) the call waits, on the same
//! connection, with `WAIT <replicas> <timeout>` for a replica to hold it.
//!
//! - **Revocations are acknowledged only once a replica holds them.** When
//!   no replica acknowledges in time, RevokeSession and RevokeUserSessions
//!   answer UNAVAILABLE: the revocation may be applied on the master only,
//!   and the caller must send it again (it is idempotent). Every revocation
//!   script writes the bucket's fence key (`w`, lua/common.lua) even when
//!   it finds nothing to revoke, so the `WAIT` of a retry covers the first
//!   attempt's deletion too (`WAIT` counts the replication offset of its
//!   connection's last write, and a master replicates in order).
//! - **Creates and refreshes stay best-effort**: failing them would not undo
//!   them, only leave the caller unsure (a rotated token it never learns).
//!   Counted as `mesh_session_replica_waits_total{result="timeout"}`.
//! - **`WAIT` never blocks another command.** Redis answers nothing after a
//!   `WAIT` on its connection until the `WAIT` returns, so a change leases a
//!   write client (`MESH_SESSION_WRITE_POOL_SIZE`) for its master alone,
//!   script and `WAIT` included ([`Writers`]); other changes to that master
//!   take another client or wait for the lease, changes to other masters and
//!   every read (validations, listings, the outbox, acknowledgements) go
//!   through connections that never carry a `WAIT`.
//!
//! # Revocations reach every cache before the call returns
//! A script that ends tokens publishes `r <nonce> <hashes>` on the bucket's
//! channel and reports how many subscribers (instances) received it. Each
//! instance drops the hashes from its cache, then publishes `a <nonce>`; the
//! change waits for that many acknowledgements (alongside `WAIT`) before
//! answering, up to `MESH_SESSION_INVALIDATION_TIMEOUT_MS` (an instance that
//! received it and then died cannot answer; one whose subscription is lost
//! was not counted and has its cache off, see `pubsub`).
//!
//! # Slot migrations
//! Every key a script touches is in its `KEYS` (lua/common.lua `key`), as
//! Redis Cluster requires, so a node refuses a script whose slot is moving
//! before it runs whenever it lacks one of its keys (`ASK`, `TRYAGAIN`); it
//! never runs on part of a bucket and never takes a migrated key for a
//! missing one. The pool follows no `MOVED`/`ASK`
//! (`mesh_runtime::redis::REDIRECTIONS` says why): a refused script is sent
//! again for up to [`REDIRECTED_RETRY`], then the call is UNAVAILABLE.
//!
//! Keys learnt from data (a token's session, a user's sessions) are asked
//! for: the script stops before its first write with `NEEDKEYS <keys>` and
//! [`Store::eval`] sends it again with them added, at most [`KEY_ROUNDS`]
//! times. The keys a script needed last time for the same first key are
//! remembered ([`KEY_HINTS`] entries) and declared up front, so a repeated
//! call takes one round trip.
//!
//! Session ids and new token hashes are chosen before a script runs, so a
//! script repeated after a lost reply (fred resends once on a broken
//! connection) answers as the first time instead of creating or rotating twice.

use std::{
    collections::HashSet,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use fred::{
    clients::{Client, Pool},
    interfaces::{ClientLike, ClusterInterface as _},
    prelude::Error as FredError,
    types::{ClusterHash, CustomCommand, Value, scripts::Script},
};
use mesh_runtime::Throttle;
use tokio::{sync::Notify, time::Instant};
use tracing::Instrument as _;

use crate::{
    metrics::{Metrics, OpLabels, ResultLabels},
    pubsub::{Acks, Expected},
    request::{Client as CallClient, NewSession, UserId},
    token::{Bucket, SessionId, TokenHash},
};

/// How many times a script is sent with more keys before the call fails:
/// each round adds the keys one step of data named (token → session → user
/// index → its sessions → their tokens), and data changing between rounds
/// may need one more.
const KEY_ROUNDS: usize = 6;

/// How many scripts' learnt keys are remembered (see the module docs).
const KEY_HINTS: usize = 16_384;

/// The keys a `NEEDKEYS` refusal asks for (lua/common.lua `need`), or `None`
/// for any other error.
fn needed_keys(e: &FredError) -> Option<Vec<String>> {
    let (_, rest) = e.details().split_once("NEEDKEYS ")?;
    serde_json::Deserializer::from_str(rest).into_iter::<Vec<String>>().next()?.ok()
}

macro_rules! script {
    ($name:literal) => {
        concat!(include_str!("lua/common.lua"), include_str!(concat!("lua/", $name, ".lua")))
    };
}

/// A Redis failure; the details are for logs (they never hold tokens).
#[derive(Debug, Clone, thiserror::Error)]
#[error("redis {op} failed: {details}")]
pub(crate) struct StoreError {
    pub(crate) op: &'static str,
    pub(crate) details: String,
}

/// A session as Redis keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Record {
    pub(crate) id: String,
    pub(crate) user_id: String,
    pub(crate) attributes_json: String,
    pub(crate) ip: String,
    pub(crate) user_agent: String,
    pub(crate) created_ms: i64,
    pub(crate) last_seen_ms: i64,
    pub(crate) idle_expires_ms: i64,
    pub(crate) absolute_expires_ms: i64,
    pub(crate) idle_timeout_ms: i64,
    /// Redis's clock when the script ran.
    pub(crate) now_ms: i64,
    pub(crate) token_hash: Option<TokenHash>,
}

impl Record {
    /// Milliseconds left before the session expires, at `now_ms`.
    pub(crate) fn remaining_ms(&self) -> i64 {
        self.idle_expires_ms.min(self.absolute_expires_ms) - self.now_ms
    }
}

/// What an audited change records besides the session: who asked, from where.
#[derive(Debug, Clone, Default)]
pub(crate) struct AuditContext {
    pub(crate) request_id: String,
    pub(crate) trace_id: String,
    pub(crate) client: CallClient,
}

fn text(v: &Value) -> String {
    v.as_string().unwrap_or_default()
}

fn int(v: &Value) -> i64 {
    v.as_i64().unwrap_or(0)
}

fn array(v: Value) -> Vec<Value> {
    match v {
        Value::Array(a) => a,
        Value::Null => Vec::new(),
        other => vec![other],
    }
}

/// Parses a `reply` (lua/common.lua) starting at its leading 1.
fn record(v: &[Value]) -> Option<Record> {
    if v.len() < 13 || int(&v[0]) != 1 {
        return None;
    }
    Some(Record {
        id: text(&v[1]),
        user_id: text(&v[2]),
        attributes_json: text(&v[3]),
        ip: text(&v[4]),
        user_agent: text(&v[5]),
        created_ms: int(&v[6]),
        last_seen_ms: int(&v[7]),
        idle_expires_ms: int(&v[8]),
        absolute_expires_ms: int(&v[9]),
        now_ms: int(&v[10]),
        idle_timeout_ms: int(&v[11]),
        token_hash: TokenHash::from_hex(&text(&v[12])),
    })
}

fn hashes(v: &[Value]) -> Vec<TokenHash> {
    v.iter().filter_map(|h| TokenHash::from_hex(&text(h))).collect()
}

#[derive(Debug)]
struct Scripts {
    validate: Script,
    create: Script,
    refresh: Script,
    revoke: Script,
    revoke_user: Script,
    list: Script,
    outbox_peek: Script,
    outbox_claim: Script,
    outbox_ack: Script,
}

impl Scripts {
    fn new() -> Self {
        Self {
            validate: Script::from_lua(script!("validate")),
            create: Script::from_lua(script!("create")),
            refresh: Script::from_lua(script!("refresh")),
            revoke: Script::from_lua(script!("revoke")),
            revoke_user: Script::from_lua(script!("revoke_user")),
            list: Script::from_lua(script!("list")),
            outbox_peek: Script::from_lua(include_str!("lua/outbox_peek.lua")),
            outbox_claim: Script::from_lua(include_str!("lua/outbox_claim.lua")),
            outbox_ack: Script::from_lua(include_str!("lua/outbox_ack.lua")),
        }
    }

    fn all(&self) -> [&Script; 9] {
        [
            &self.validate,
            &self.create,
            &self.refresh,
            &self.revoke,
            &self.revoke_user,
            &self.list,
            &self.outbox_peek,
            &self.outbox_claim,
            &self.outbox_ack,
        ]
    }
}

/// Durability settings of changes.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Durability {
    pub(crate) replicas: u32,
    pub(crate) timeout: Duration,
}

/// Least time between two warnings about replica waits.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// How long a command refused because its slot is moving is sent again
/// before the call answers UNAVAILABLE.
const REDIRECTED_RETRY: Duration = Duration::from_millis(500);

/// How long a change waits for a write client beyond the `WAIT` timeout.
const LEASE_WAIT: Duration = Duration::from_secs(1);

/// How long a rotated token's pointer remembers the rotation (for a retry).
const ROTATION_MEMORY: Duration = Duration::from_secs(60);

/// The write clients, each leased to one change at a time per master, so
/// that nothing ever queues behind a change's `WAIT` on its connection.
#[derive(Debug)]
struct Writers {
    pool: Pool,
    metrics: Arc<Metrics>,
    /// `(client index, master)` pairs leased out.
    busy: Mutex<HashSet<(usize, String)>>,
    freed: Notify,
    next: AtomicUsize,
}

/// A write client leased for one master; returned when dropped.
#[derive(Debug)]
struct Lease<'a> {
    writers: &'a Writers,
    key: (usize, String),
    client: Client,
}

impl Writers {
    fn new(pool: Pool, metrics: Arc<Metrics>) -> Self {
        Self { pool, metrics, busy: Mutex::default(), freed: Notify::new(), next: AtomicUsize::new(0) }
    }

    /// A client no other change uses for the master of `slot`, waiting up
    /// to `within` for one (then `None`).
    async fn lease(&self, slot: u16, within: Duration) -> Option<Lease<'_>> {
        let clients = self.pool.clients();
        // The master as the clients last learnt it (one routing for all: they
        // sync on the same events). Unknown routing: one lease for all.
        let master = clients[0]
            .cached_cluster_state()
            .and_then(|s| s.get_server(slot).map(ToString::to_string))
            .unwrap_or_default();
        let asked = Instant::now();
        let deadline = asked + within;
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let m = &self.metrics;
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            {
                let mut busy = self.busy.lock().unwrap_or_else(|p| p.into_inner());
                for k in 0..clients.len() {
                    let i = (start + k) % clients.len();
                    let key = (i, master.clone());
                    if !busy.contains(&key) {
                        busy.insert(key.clone());
                        m.write_leases_in_use.inc();
                        m.write_lease_wait_seconds.observe(asked.elapsed().as_secs_f64());
                        return Some(Lease { writers: self, key, client: clients[i].clone() });
                    }
                }
            }
            if tokio::time::timeout_at(deadline, freed).await.is_err() {
                m.write_lease_timeouts.inc();
                return None;
            }
        }
    }
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        self.writers.busy.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.key);
        self.writers.metrics.write_leases_in_use.dec();
        self.writers.freed.notify_waiters();
    }
}

/// Whether a change may be acknowledged without a replica holding it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Replicated {
    /// Fail the call (UNAVAILABLE) unless a replica acknowledged it.
    Required,
    /// Succeed anyway; logged and counted.
    BestEffort,
}

/// The Redis side of the service. Cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct Store {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    reads: Pool,
    writes: Writers,
    prefix: String,
    scripts: Scripts,
    durability: Durability,
    outbox_ttl: Duration,
    metrics: Arc<Metrics>,
    wait_warnings: Throttle,
    acks: Arc<Acks>,
    ack_timeout: Duration,
    ack_warnings: Throttle,
    /// `(op, KEYS[1])` → the keys the script learnt last time.
    key_hints: quick_cache::sync::Cache<(&'static str, String), Arc<[String]>>,
}

/// The result of a change: the session (if any) and the tokens it revoked.
#[derive(Debug, Clone)]
pub(crate) struct Changed<T> {
    pub(crate) value: T,
    pub(crate) revoked: Vec<TokenHash>,
}

/// One claimed outbox event.
#[derive(Debug, Clone)]
pub(crate) struct OutboxEntry {
    pub(crate) id: String,
    pub(crate) event: String,
}

/// What a claim found.
#[derive(Debug, Clone)]
pub(crate) enum Claim {
    /// Another instance is draining the bucket.
    Busy,
    /// The events to deliver, oldest first (empty: nothing waits).
    Events(Vec<OutboxEntry>),
}

impl Store {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        reads: Pool,
        writes: Pool,
        prefix: String,
        durability: Durability,
        outbox_ttl: Duration,
        acks: Arc<Acks>,
        ack_timeout: Duration,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                reads,
                writes: Writers::new(writes, metrics.clone()),
                prefix,
                scripts: Scripts::new(),
                durability,
                outbox_ttl,
                metrics,
                wait_warnings: Throttle::new(WARN_EVERY),
                acks,
                ack_timeout,
                ack_warnings: Throttle::new(WARN_EVERY),
                key_hints: quick_cache::sync::Cache::new(KEY_HINTS),
            }),
        }
    }

    /// The configured key prefix.
    pub(crate) fn prefix(&self) -> &str {
        &self.inner.prefix
    }

    /// The bucket's key base.
    pub(crate) fn base(&self, b: Bucket) -> String {
        b.base(&self.inner.prefix)
    }

    /// The bucket's invalidation channel.
    pub(crate) fn channel(&self, b: Bucket) -> String {
        format!("{}c", self.base(b))
    }

    fn token_key(&self, b: Bucket, h: &TokenHash) -> String {
        format!("{}t:{}", self.base(b), h.hex())
    }

    fn ctx_json(&self, ctx: &AuditContext, nonce: &str) -> String {
        serde_json::json!({
            "k": uuid::Uuid::now_v7().to_string(),
            "n": nonce,
            "r": ctx.request_id,
            "tr": ctx.trace_id,
            "ip": ctx.client.ip,
            "ua": ctx.client.user_agent,
            "ttl": self.inner.outbox_ttl.as_millis().to_string(),
        })
        .to_string()
    }

    /// Runs `script` on `client`, timed, traced and counted, declaring the
    /// keys it asks for (module docs, "Slot migrations").
    async fn eval(
        &self,
        client: &Client,
        op: &'static str,
        script: &Script,
        mut keys: Vec<String>,
        args: Vec<String>,
    ) -> Result<Value, StoreError> {
        let start = Instant::now();
        let slot = mesh_runtime::redis::slot_of(&keys[0]);
        let span = mesh_runtime::redis::span_at(client, "EVALSHA", Some(op), slot);
        let hint = (op, keys[0].clone());
        let given = keys.len();
        let mut hinted = false;
        if let Some(learnt) = self.inner.key_hints.get(&hint) {
            keys.extend(learnt.iter().cloned());
            hinted = true;
        }
        let mut rounds = 0;
        let r = loop {
            // A script on a slot in motion is refused before it runs (a
            // redirection, mesh_runtime::redis::REDIRECTIONS): nothing was
            // done, so it is sent again until the slot has settled.
            let r = mesh_runtime::redis::retry_redirected(REDIRECTED_RETRY, || {
                script.evalsha_with_reload::<Value, _, _>(client, keys.clone(), args.clone())
            })
            .instrument(span.clone())
            .await;
            rounds += 1;
            match r.as_ref().err().and_then(needed_keys) {
                Some(more) if rounds < KEY_ROUNDS => {
                    // The data changed since the hint: learn the keys anew,
                    // so hints never hold more than one learning's keys.
                    if std::mem::take(&mut hinted) {
                        keys.truncate(given);
                    }
                    keys.extend(more);
                }
                Some(_) => {
                    break Err(StoreError {
                        op,
                        details: format!("keys still unknown after {rounds} rounds"),
                    });
                }
                None => break r.map_err(|e| StoreError { op, details: e.details().to_owned() }),
            }
        };
        if r.is_ok() && keys.len() > given {
            self.inner.key_hints.insert(hint, keys.split_off(given).into());
        }
        let m = &self.inner.metrics;
        m.redis_seconds.get_or_create(&OpLabels { op }).observe(start.elapsed().as_secs_f64());
        r.inspect_err(|_| {
            span.record("otel.status_code", "ERROR");
            m.redis_errors.get_or_create(&OpLabels { op }).inc();
        })
    }

    /// Runs a change on a leased write client (`ARGV[1]` = `base`, `ARGV[2]`
    /// = the audit context, then `args`), then waits, together, for a replica
    /// to hold it and for every instance that received its revocations to
    /// have dropped them from its cache (module docs). Returns the script's
    /// reply without the count of receivers in front; with
    /// [`Replicated::Required`], an error when no replica acknowledged it.
    #[allow(clippy::too_many_arguments)]
    async fn change(
        &self,
        op: &'static str,
        script: &Script,
        keys: Vec<String>,
        base: String,
        ctx: &AuditContext,
        args: Vec<String>,
        replicated: Replicated,
    ) -> Result<Vec<Value>, StoreError> {
        let slot = fred::util::redis_keyslot(keys[0].as_bytes());
        let within = self.inner.durability.timeout + LEASE_WAIT;
        let lease = self.inner.writes.lease(slot, within).await.ok_or_else(|| StoreError {
            op,
            details: "every write client is busy with this master".to_owned(),
        })?;
        let nonce = uuid::Uuid::new_v4().simple().to_string();
        let mut all = vec![base, self.ctx_json(ctx, &nonce)];
        all.extend(args);
        // Before the script: acknowledgements may arrive before its reply.
        let acks = self.inner.acks.expect(&nonce);
        let mut v = array(self.eval(&lease.client, op, script, keys, all).await?);
        let receivers = if v.is_empty() { 0 } else { int(&v.remove(0)).max(0) as u64 };
        let (held, ()) =
            tokio::join!(self.wait_for_replicas(&lease.client, slot), self.wait_for_acks(acks, receivers));
        drop(lease);
        if !held && replicated == Replicated::Required {
            return Err(StoreError { op, details: "no replica acknowledged the change in time".to_owned() });
        }
        Ok(v)
    }

    async fn wait_for_acks(&self, acks: Expected, receivers: u64) {
        if receivers == 0 {
            return;
        }
        let complete = acks.wait(receivers, self.inner.ack_timeout).await;
        let result = if complete { "complete" } else { "timeout" };
        self.inner.metrics.revocation_acks.get_or_create(&ResultLabels { result }).inc();
        if !complete && let Some(suppressed) = self.inner.ack_warnings.ready() {
            tracing::warn!(
                receivers,
                timeout = ?self.inner.ack_timeout,
                suppressed,
                "not every instance confirmed a revocation in time"
            );
        }
    }

    /// `WAIT`s for the configured replicas; whether they acknowledged.
    async fn wait_for_replicas(&self, client: &Client, slot: u16) -> bool {
        let Durability { replicas, timeout } = self.inner.durability;
        if replicas == 0 {
            return true;
        }
        // Not "blocking" for fred, and nothing else is sent on this
        // connection meanwhile: the caller holds its lease.
        let cmd = CustomCommand::new_static("WAIT", ClusterHash::Custom(slot), false);
        let start = Instant::now();
        let r: Result<i64, FredError> = client
            .custom(cmd, vec![i64::from(replicas), timeout.as_millis() as i64])
            .instrument(mesh_runtime::redis::span_at(client, "WAIT", None, slot))
            .await;
        let m = &self.inner.metrics;
        m.redis_seconds.get_or_create(&OpLabels { op: "wait" }).observe(start.elapsed().as_secs_f64());
        let result = match r {
            Ok(n) if n >= i64::from(replicas) => "ok",
            Ok(n) => {
                if let Some(suppressed) = self.inner.wait_warnings.ready() {
                    tracing::warn!(
                        slot,
                        acknowledged = n,
                        wanted = replicas,
                        suppressed,
                        "no replica acknowledged a session change in time"
                    );
                }
                "timeout"
            }
            Err(e) => {
                if let Some(suppressed) = self.inner.wait_warnings.ready() {
                    tracing::warn!(slot, error = %e.details(), suppressed, "waiting for replicas failed");
                }
                "error"
            }
        };
        m.replica_waits.get_or_create(&ResultLabels { result }).inc();
        result == "ok"
    }

    /// Validates (and touches) a token: one round trip when the token's
    /// session (and, to touch, the user's index) is known from an earlier
    /// call, else two or three (module docs, "Slot migrations").
    pub(crate) async fn validate(
        &self,
        b: Bucket,
        h: &TokenHash,
        touch: bool,
        touch_interval: Duration,
    ) -> Result<Option<Record>, StoreError> {
        let s = &self.inner.scripts;
        let client = self.inner.reads.next().clone();
        let v = self
            .eval(
                &client,
                "session_validate",
                &s.validate,
                vec![self.token_key(b, h)],
                vec![
                    self.base(b),
                    String::new(),
                    if touch { "1" } else { "0" }.to_owned(),
                    touch_interval.as_millis().to_string(),
                ],
            )
            .await?;
        Ok(record(&array(v)))
    }

    /// Creates a session, evicting the user's oldest beyond `cap`.
    pub(crate) async fn create(
        &self,
        new: &NewSession,
        id: &SessionId,
        h: &TokenHash,
        cap: u32,
        ctx: &AuditContext,
    ) -> Result<Changed<Record>, StoreError> {
        let b = new.user_id.bucket();
        let base = self.base(b);
        let v = self
            .change(
                "session_create",
                &self.inner.scripts.create,
                vec![
                    format!("{base}u:{}", new.user_id.as_str()),
                    format!("{base}s:{}", id.as_str()),
                    format!("{base}t:{}", h.hex()),
                    format!("{base}o"),
                ],
                base,
                ctx,
                vec![
                    id.as_str().to_owned(),
                    h.hex(),
                    new.user_id.as_str().to_owned(),
                    new.attributes_json.clone(),
                    new.client.ip.clone(),
                    new.client.user_agent.clone(),
                    new.idle_timeout.as_millis().to_string(),
                    new.absolute_timeout.as_millis().to_string(),
                    cap.to_string(),
                ],
                Replicated::BestEffort,
            )
            .await?;
        let rec = record(&v).ok_or_else(|| StoreError {
            op: "session_create",
            details: "the script answered without a session".to_owned(),
        })?;
        Ok(Changed { value: rec, revoked: hashes(&v[13..]) })
    }

    /// Rotates a token: `None` when it has no live session.
    pub(crate) async fn refresh(
        &self,
        b: Bucket,
        old: &TokenHash,
        new: &TokenHash,
        ctx: &AuditContext,
    ) -> Result<Option<Record>, StoreError> {
        let v = self
            .change(
                "session_refresh",
                &self.inner.scripts.refresh,
                vec![self.token_key(b, old), self.token_key(b, new), format!("{}o", self.base(b))],
                self.base(b),
                ctx,
                vec![old.hex(), new.hex(), ROTATION_MEMORY.as_millis().to_string()],
                Replicated::BestEffort,
            )
            .await?;
        Ok(record(&v))
    }

    /// Revokes one session by id; the revoked token, if it was live.
    pub(crate) async fn revoke_id(
        &self,
        id: &SessionId,
        ctx: &AuditContext,
    ) -> Result<Option<TokenHash>, StoreError> {
        let base = self.base(id.bucket());
        let keys = vec![format!("{base}s:{}", id.as_str()), format!("{base}w"), format!("{base}o")];
        self.revoke(keys, base, "s", ctx).await
    }

    /// Revokes one session by token.
    pub(crate) async fn revoke_token(
        &self,
        b: Bucket,
        h: &TokenHash,
        ctx: &AuditContext,
    ) -> Result<Option<TokenHash>, StoreError> {
        let base = self.base(b);
        self.revoke(vec![self.token_key(b, h), format!("{base}w"), format!("{base}o")], base, "t", ctx).await
    }

    async fn revoke(
        &self,
        keys: Vec<String>,
        base: String,
        kind: &str,
        ctx: &AuditContext,
    ) -> Result<Option<TokenHash>, StoreError> {
        let v = self
            .change(
                "session_revoke",
                &self.inner.scripts.revoke,
                keys,
                base,
                ctx,
                vec![kind.to_owned()],
                Replicated::Required,
            )
            .await?;
        Ok((v.first().map(int) == Some(1)).then(|| hashes(&v[1..]).into_iter().next()).flatten())
    }

    /// Revokes every session of a user but `except`; how many, and their tokens.
    pub(crate) async fn revoke_user(
        &self,
        user: &UserId,
        except: Option<&SessionId>,
        ctx: &AuditContext,
    ) -> Result<Changed<u32>, StoreError> {
        let base = self.base(user.bucket());
        let v = self
            .change(
                "session_revoke_user",
                &self.inner.scripts.revoke_user,
                vec![format!("{base}u:{}", user.as_str()), format!("{base}w"), format!("{base}o")],
                base,
                ctx,
                vec![user.as_str().to_owned(), except.map(|e| e.as_str().to_owned()).unwrap_or_default()],
                Replicated::Required,
            )
            .await?;
        let n = v.first().map(int).unwrap_or(0);
        Ok(Changed { value: u32::try_from(n).unwrap_or(0), revoked: hashes(v.get(1..).unwrap_or(&[])) })
    }

    /// A user's live sessions, newest first.
    pub(crate) async fn list(&self, user: &UserId) -> Result<Vec<Record>, StoreError> {
        let base = self.base(user.bucket());
        let client = self.inner.reads.next().clone();
        let v = self
            .eval(
                &client,
                "session_list",
                &self.inner.scripts.list,
                vec![format!("{base}u:{}", user.as_str())],
                vec![base, String::new(), user.as_str().to_owned()],
            )
            .await?;
        Ok(array(v).into_iter().filter_map(|s| record(&array(s))).collect())
    }

    fn outbox_keys(&self, b: Bucket) -> (String, String, String) {
        let base = self.base(b);
        (format!("{base}o"), format!("{base}l"), format!("{base}x"))
    }

    /// Depth of a bucket's outbox and the id of its oldest event.
    pub(crate) async fn outbox_peek(&self, b: Bucket) -> Result<(u64, Option<String>), StoreError> {
        let (outbox, _, _) = self.outbox_keys(b);
        let client = self.inner.reads.next().clone();
        let v = array(
            self.eval(&client, "session_outbox_peek", &self.inner.scripts.outbox_peek, vec![outbox], vec![])
                .await?,
        );
        let depth = v.first().map(int).unwrap_or(0).max(0) as u64;
        let first = v.get(1).map(text).filter(|s| !s.is_empty());
        Ok((depth, first))
    }

    /// Claims up to `count` events of a bucket's outbox for `owner`.
    pub(crate) async fn outbox_claim(
        &self,
        b: Bucket,
        owner: &str,
        lease: Duration,
        count: usize,
    ) -> Result<Claim, StoreError> {
        let (outbox, lease_key, _) = self.outbox_keys(b);
        let client = self.inner.reads.next().clone();
        let v = array(
            self.eval(
                &client,
                "session_outbox_claim",
                &self.inner.scripts.outbox_claim,
                vec![outbox, lease_key],
                vec![owner.to_owned(), lease.as_millis().to_string(), count.to_string()],
            )
            .await?,
        );
        if v.first().map(int) != Some(1) {
            return Ok(Claim::Busy);
        }
        let events = v[1..]
            .chunks_exact(2)
            .map(|pair| OutboxEntry { id: text(&pair[0]), event: text(&pair[1]) })
            .collect();
        Ok(Claim::Events(events))
    }

    /// Deletes delivered events (`dead` first go to the dead-letter stream)
    /// and releases the lease; returns the events left.
    pub(crate) async fn outbox_ack(
        &self,
        b: Bucket,
        owner: &str,
        dead: &[String],
        delivered: &[String],
    ) -> Result<u64, StoreError> {
        let (outbox, lease_key, dead_key) = self.outbox_keys(b);
        let mut args =
            vec![owner.to_owned(), dead.len().to_string(), self.inner.outbox_ttl.as_millis().to_string()];
        args.extend(dead.iter().cloned());
        args.extend(delivered.iter().cloned());
        let client = self.inner.reads.next().clone();
        let v = self
            .eval(
                &client,
                "session_outbox_ack",
                &self.inner.scripts.outbox_ack,
                vec![outbox, lease_key, dead_key],
                args,
            )
            .await?;
        Ok(int(&v).max(0) as u64)
    }
}

/// Loads every script on every master once Redis answers, so the first calls
/// do not pay a `NOSCRIPT` round trip (`EVALSHA` reloads them in any case).
pub(crate) async fn preload_scripts(pool: Pool) {
    if !mesh_runtime::redis::wait_connected(&pool, Duration::from_secs(30)).await {
        return;
    }
    for script in Scripts::new().all() {
        if let Err(e) = script.load(pool.next()).await {
            tracing::debug!(error = %e.details(), "cannot preload session scripts, evalsha will load them");
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_parse_into_records() {
        let h = TokenHash([7; 32]);
        let s = |x: &str| Value::String(x.into());
        let v = vec![
            Value::Integer(1),
            s("ses_001_AAAAAAAAAAAAAAAAAAAAAA"),
            s("alice"),
            s("{}"),
            s("10.0.0.1"),
            Value::Null,
            s("1000"),
            s("2000"),
            s("3000"),
            s("9000"),
            s("2500"),
            s("1000"),
            s(&h.hex()),
            s(&TokenHash([9; 32]).hex()),
        ];
        let r = record(&v).unwrap();
        assert_eq!((r.user_id.as_str(), r.user_agent.as_str()), ("alice", ""));
        assert_eq!((r.created_ms, r.now_ms, r.remaining_ms()), (1000, 2500, 500));
        assert_eq!(r.token_hash, Some(h));
        assert_eq!(hashes(&v[13..]), vec![TokenHash([9; 32])]);
        assert!(record(&[Value::Integer(0)]).is_none());
    }

    #[test]
    fn needkeys_refusals_name_their_keys() {
        use fred::error::ErrorKind;
        // As Redis 7 words an error table raised by a script.
        let e = FredError::new(
            ErrorKind::Unknown,
            r#"NEEDKEYS ["p{session:0a1}:u:a \"b\" c","p{session:0a1}:s:x"] script: 3e3a, on @user_script:1."#,
        );
        assert_eq!(
            needed_keys(&e),
            Some(vec![r#"p{session:0a1}:u:a "b" c"#.to_owned(), "p{session:0a1}:s:x".to_owned()])
        );
        assert_eq!(needed_keys(&FredError::new(ErrorKind::Unknown, "ERR something else")), None);
    }
}
