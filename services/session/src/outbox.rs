//! Delivering the audit outbox to the audit service.
//!
//! Every change writes its audit events into its bucket's outbox (a Redis
//! stream in the bucket's slot) in the same atomic script, so no change
//! goes unrecorded whatever crashes, and no audit call ever sits on the
//! path of a session call. Every instance with `MESH_AUDIT_ADDR` drains:
//!
//! - **When.** A change publishes `o` on its bucket's channel and the
//!   bucket is drained at once; a sweep of every bucket every
//!   `MESH_SESSION_OUTBOX_SWEEP_MS` catches anything missed (a notification
//!   lost with a connection, a drainer that died) and feeds the depth and
//!   age metrics.
//! - **Who.** A drain claims the bucket with a lease (`l`, set only while
//!   events wait): one drainer per bucket at a time, so a bucket's events
//!   are appended in order; a dead drainer's lease runs out and another
//!   instance takes over.
//! - **How.** At most `MESH_SESSION_OUTBOX_BATCH` events per drain, one at a
//!   time in order, each an Append with the event's idempotency key (unique
//!   per event, chosen with the change), within half the lease. Delivered
//!   events are deleted at the end. An event delivered twice (a drainer
//!   died between Append and delete, or lost its lease) is still one row:
//!   the audit service answers a repeated key with the first result.
//! - **Failures.** The first failed Append stops the drain; the bucket is
//!   retried after a backoff (`mesh_tower::Backoff`: 500 ms doubling, plus
//!   10–30 % jitter, up to `MESH_SESSION_OUTBOX_RETRY_MAX_MS`), and the client stack's breaker
//!   stops calls to an audit service that is down. An event the audit
//!   service refuses for good (INVALID_ARGUMENT) moves to the bucket's
//!   dead-letter stream (`x`) with an error log, so it cannot block the
//!   ones behind it.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use futures::{StreamExt as _, stream};
use mesh_client::AuditClient;
use mesh_proto::audit::{Actor, AppendRequest, AuditEvent, Outcome, Resource, Source};
use mesh_runtime::grpc::CallContext;
use prost_types::{Struct, Value, value::Kind};
use serde::Deserialize;
use tokio::{
    sync::mpsc,
    task::JoinSet,
    time::{Instant, sleep_until},
};
use tonic::Code;

use crate::{
    config::SessionConfig,
    metrics::{Metrics, ResultLabels},
    store::{Claim, OutboxEntry, Store},
    token::{AuditHasher, Bucket, TokenHash},
};

/// The `source.service` of every event (the audit service's idempotency scope).
pub const SOURCE_SERVICE: &str = "mesh-session";

/// Peeks in flight at once during a sweep.
const SWEEP_CONCURRENCY: usize = 64;

/// An event as the scripts write it (lua/common.lua `audit`).
#[derive(Debug, Deserialize)]
struct Written {
    k: String,
    a: String,
    s: String,
    u: String,
    t: String,
    #[serde(default)]
    p: Option<String>,
    #[serde(default)]
    m: Option<String>,
    at: String,
    #[serde(default)]
    r: Option<String>,
    #[serde(default)]
    tr: Option<String>,
    #[serde(default)]
    ip: Option<String>,
    #[serde(default)]
    ua: Option<String>,
}

fn string(s: impl Into<String>) -> Value {
    Value { kind: Some(Kind::StringValue(s.into())) }
}

/// The Append of an outbox event, with salted token hashes only.
fn append_request(json: &str, hasher: &AuditHasher) -> Option<AppendRequest> {
    let w: Written = serde_json::from_str(json).ok()?;
    let at: i64 = w.at.parse().ok()?;
    let salted = |hex: &str| TokenHash::from_hex(hex).map(|h| hasher.hash(&h));
    let mut metadata = Struct::default();
    metadata.fields.insert("token_hash".into(), string(salted(&w.t)?));
    if let Some(p) = w.p.as_deref().and_then(salted) {
        metadata.fields.insert("previous_token_hash".into(), string(p));
    }
    if let Some(m) = w.m {
        let key = match w.a.as_str() {
            "session.evict" => "reason",
            "session.revoke" => "by",
            _ => "scope",
        };
        metadata.fields.insert(key.into(), string(m));
    }
    Some(AppendRequest {
        event: Some(AuditEvent {
            occurred_at: Some(prost_types::Timestamp {
                seconds: at.div_euclid(1000),
                nanos: (at.rem_euclid(1000) * 1_000_000) as i32,
            }),
            actor: Some(Actor { r#type: "user".into(), id: w.u }),
            action: w.a,
            resource: Some(Resource { r#type: "session".into(), id: w.s }),
            outcome: Outcome::Success as i32,
            source: Some(Source {
                ip: w.ip.unwrap_or_default(),
                user_agent: w.ua.unwrap_or_default(),
                service: SOURCE_SERVICE.into(),
            }),
            request_id: w.r.unwrap_or_default(),
            trace_id: w.tr.unwrap_or_default(),
            metadata: Some(metadata),
            ..Default::default()
        }),
        idempotency_key: w.k,
    })
}

/// How one drain of one bucket ended.
#[derive(Debug)]
enum Drained {
    /// Done; `more` when the batch was full and events may remain.
    Ok { more: bool },
    /// Another instance holds the bucket.
    Busy,
    /// Delivery (or Redis) failed: retry after a backoff.
    Failed,
}

/// See the module docs.
#[derive(Debug)]
pub(crate) struct Drainer {
    store: Store,
    audit: AuditClient,
    hasher: AuditHasher,
    owner: String,
    batch: usize,
    concurrency: usize,
    lease: Duration,
    sweep: Duration,
    timeout: Duration,
    retry: mesh_tower::Backoff,
    metrics: Arc<Metrics>,
}

impl Drainer {
    pub(crate) fn new(
        store: Store,
        audit: AuditClient,
        hasher: AuditHasher,
        c: &SessionConfig,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            store,
            audit,
            hasher,
            owner: uuid::Uuid::new_v4().to_string(),
            batch: c.outbox_batch,
            concurrency: c.outbox_concurrency,
            lease: c.outbox_lease,
            sweep: c.outbox_sweep,
            timeout: c.audit_timeout,
            retry: mesh_tower::Backoff::new(c.outbox_retry_base, c.outbox_retry_max),
            metrics,
        }
    }

    /// Drains until the task is aborted. `notified` receives buckets that just got events.
    pub(crate) async fn run(self: Arc<Self>, mut notified: mpsc::Receiver<Bucket>) {
        let mut pending: VecDeque<Bucket> = VecDeque::new();
        let mut queued: HashSet<Bucket> = HashSet::new();
        let mut active: HashSet<Bucket> = HashSet::new();
        // Bucket -> (not before, failed drains in a row).
        let mut backoff: HashMap<Bucket, (Instant, u32)> = HashMap::new();
        let mut running: JoinSet<(Bucket, Drained)> = JoinSet::new();
        let mut sweep = tokio::time::interval(self.sweep);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

        let enqueue = |b: Bucket,
                       pending: &mut VecDeque<Bucket>,
                       queued: &mut HashSet<Bucket>,
                       backoff: &HashMap<Bucket, (Instant, u32)>| {
            let waiting = backoff.get(&b).is_some_and(|(t, _)| *t > Instant::now());
            if !waiting && queued.insert(b) {
                pending.push_back(b);
            }
        };

        loop {
            while running.len() < self.concurrency {
                let Some(b) = pending.pop_front() else { break };
                queued.remove(&b);
                if active.insert(b) {
                    let this = self.clone();
                    running.spawn(async move { (b, this.drain(b).await) });
                }
            }
            let next_retry = backoff.values().map(|(t, _)| *t).filter(|t| *t > Instant::now()).min();
            tokio::select! {
                _ = sweep.tick() => {
                    for b in self.sweep_all().await {
                        enqueue(b, &mut pending, &mut queued, &backoff);
                    }
                }
                Some(b) = notified.recv() => enqueue(b, &mut pending, &mut queued, &backoff),
                Some(done) = running.join_next() => {
                    let Ok((b, result)) = done else { continue };
                    active.remove(&b);
                    match result {
                        Drained::Ok { more } => {
                            backoff.remove(&b);
                            if more {
                                enqueue(b, &mut pending, &mut queued, &backoff);
                            }
                        }
                        Drained::Busy => {}
                        Drained::Failed => {
                            let failed = backoff.get(&b).map_or(0, |(_, n)| *n);
                            let wait = self.retry.delay(failed);
                            backoff.insert(b, (Instant::now() + wait, failed.saturating_add(1)));
                        }
                    }
                }
                () = sleep_until(next_retry.unwrap_or_else(Instant::now)), if next_retry.is_some() => {
                    let due: Vec<Bucket> =
                        backoff.iter().filter(|(_, (t, _))| *t <= Instant::now()).map(|(b, _)| *b).collect();
                    for b in due {
                        enqueue(b, &mut pending, &mut queued, &backoff);
                    }
                }
            }
        }
    }

    /// Peeks at every bucket: sets the depth and age metrics, returns the
    /// buckets with events.
    async fn sweep_all(&self) -> Vec<Bucket> {
        let now_ms = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as i64;
        let results: Vec<_> = stream::iter(Bucket::all())
            .map(|b| async move { (b, self.store.outbox_peek(b).await) })
            .buffer_unordered(SWEEP_CONCURRENCY)
            .collect()
            .await;
        let (mut depth, mut oldest_ms, mut failed) = (0u64, None::<i64>, 0usize);
        let mut busy = Vec::new();
        for (b, r) in results {
            match r {
                Ok((0, _)) => {}
                Ok((n, first)) => {
                    depth += n;
                    let ms = first.as_deref().and_then(|id| id.split('-').next()?.parse::<i64>().ok());
                    if let Some(ms) = ms {
                        oldest_ms = Some(oldest_ms.map_or(ms, |o| o.min(ms)));
                    }
                    busy.push(b);
                }
                Err(_) => failed += 1,
            }
        }
        if failed > 0 {
            tracing::debug!(failed, "outbox sweep could not read some buckets");
            // A partial sweep would under-report: keep the last values.
            return busy;
        }
        self.metrics.outbox_depth.set(depth as i64);
        let age = oldest_ms.map_or(0, |ms| (now_ms - ms).max(0) / 1000);
        self.metrics.outbox_oldest_seconds.set(age);
        busy
    }

    async fn drain(&self, b: Bucket) -> Drained {
        let started = Instant::now();
        let events = match self.store.outbox_claim(b, &self.owner, self.lease, self.batch).await {
            Ok(Claim::Busy) => return Drained::Busy,
            Ok(Claim::Events(e)) => e,
            Err(e) => {
                tracing::debug!(error = %e, "cannot claim an outbox");
                return Drained::Failed;
            }
        };
        if events.is_empty() {
            return Drained::Ok { more: false };
        }
        let (mut delivered, mut dead, mut failed) = (Vec::new(), Vec::new(), false);
        for OutboxEntry { id, event } in events {
            // Leave the rest for the next drain well before the lease runs out.
            if started.elapsed() > self.lease / 2 {
                break;
            }
            let Some(req) = append_request(&event, &self.hasher) else {
                tracing::error!(bucket = %b.hint(), event = %id, "unreadable audit event, moved to the dead-letter stream");
                self.metrics.audit_events.get_or_create(&ResultLabels { result: "dead_lettered" }).inc();
                dead.push(id);
                continue;
            };
            match self.append(req).await {
                Ok(()) => {
                    self.metrics.audit_events.get_or_create(&ResultLabels { result: "delivered" }).inc();
                    delivered.push(id);
                }
                Err(s) if matches!(s.code(), Code::InvalidArgument | Code::OutOfRange) => {
                    tracing::error!(
                        bucket = %b.hint(),
                        event = %id,
                        error = %s.message(),
                        "the audit service refused an event for good, moved to the dead-letter stream"
                    );
                    self.metrics.audit_events.get_or_create(&ResultLabels { result: "dead_lettered" }).inc();
                    dead.push(id);
                }
                Err(s) => {
                    self.metrics.audit_events.get_or_create(&ResultLabels { result: "failed" }).inc();
                    tracing::debug!(code = ?s.code(), error = %s.message(), "audit append failed, retrying later");
                    failed = true;
                    break;
                }
            }
        }
        match self.store.outbox_ack(b, &self.owner, &dead, &delivered).await {
            // Events left: the batch was full, the time was up, or new ones came.
            Ok(left) if !failed => Drained::Ok { more: left > 0 },
            Ok(_) => Drained::Failed,
            Err(e) => {
                // The events stay; redelivery is harmless (idempotency keys).
                tracing::warn!(error = %e, "cannot acknowledge delivered audit events");
                Drained::Failed
            }
        }
    }

    async fn append(&self, req: AppendRequest) -> Result<(), tonic::Status> {
        let event = req.event.as_ref().expect("built with an event");
        let rid = if event.request_id.is_empty() {
            uuid::Uuid::new_v4().to_string()
        } else {
            event.request_id.clone()
        };
        let mut req = tonic::Request::new(req);
        req.set_timeout(self.timeout);
        // The original call's request id travels with the event.
        CallContext::new(rid, None).scope(self.audit.append(req)).await.map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_become_appends_with_salted_hashes_only() {
        let t = TokenHash([1; 32]);
        let p = TokenHash([2; 32]);
        let json = serde_json::json!({
            "k": "key:1", "a": "session.refresh", "s": "ses_001_x", "u": "alice", "t": t.hex(),
            "p": p.hex(), "at": "1700000000123", "r": "req-1",
            "tr": "0af7651916cd43dd8448eb211c80319c", "ip": "10.0.0.1", "ua": "ua/1"
        })
        .to_string();
        let hasher = AuditHasher::new(b"0123456789abcdef");
        let req = append_request(&json, &hasher).unwrap();
        assert_eq!(req.idempotency_key, "key:1");
        let e = req.event.unwrap();
        assert_eq!((e.action.as_str(), e.request_id.as_str()), ("session.refresh", "req-1"));
        assert_eq!(
            e.occurred_at.unwrap(),
            prost_types::Timestamp { seconds: 1_700_000_000, nanos: 123_000_000 }
        );
        assert_eq!(e.resource.unwrap().id, "ses_001_x");
        let m = e.metadata.unwrap();
        let text = format!("{m:?}");
        assert!(!text.contains(&t.hex()) && !text.contains(&p.hex()), "raw hashes never leave");
        assert_eq!(m.fields["token_hash"], string(hasher.hash(&t)));
        assert_eq!(m.fields["previous_token_hash"], string(hasher.hash(&p)));
        assert!(append_request("{", &hasher).is_none());
    }
}
