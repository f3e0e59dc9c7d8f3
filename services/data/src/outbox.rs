//! Delivering the audit outbox to the audit service.
//!
//! Every change writes its audit event into `audit_outbox` in the same
//! statement as the change itself (`data_write`), so a change and its event
//! are committed together or not at all. Delivery is at-least-once from the
//! outbox and exactly-once in the audit log: each event carries its own
//! idempotency key (a random UUID chosen with the change, scoped by source
//! service `mesh-data`), and the audit service answers a repeated key with
//! the first result instead of a second row.
//!
//! - **At once.** After the commit, the call hands its events to this
//!   instance's deliverers and returns; at most `MESH_DATA_OUTBOX_CONCURRENCY`
//!   Appends are in flight. The delivery span is a child of the call's span,
//!   so the Append and the audit service's own spans join the write's trace.
//! - **Acknowledged** events are deleted, batched: whatever was delivered
//!   while the last delete ran goes in the next one.
//! - **Swept.** Every `MESH_DATA_OUTBOX_SWEEP_MS`, each instance claims due
//!   events (`FOR UPDATE SKIP LOCKED`, a lease of `MESH_DATA_OUTBOX_LEASE_MS`).
//!   An event is due once the grace its writer had (`MESH_DATA_OUTBOX_GRACE_MS`)
//!   is over and it is still there: its Append failed, the hand-off queue
//!   was full, or the writer died (a `kill -9` between commit and
//!   delivery). A swept event joins its original trace through the stored
//!   `traceparent`.
//! - **Failures.** A failed Append is retried after a jittered backoff
//!   (`mesh_tower::Backoff`, from 1 s doubling up to
//!   `MESH_DATA_OUTBOX_RETRY_MAX_MS`); the client stack's breaker stops
//!   calls to an audit service that is down. An event the audit service
//!   refuses for good (INVALID_ARGUMENT) is marked dead with an error log and
//!   kept for an operator; it never blocks the others.

use std::{sync::Arc, time::Duration};

use chrono::{DateTime, Utc};
use mesh_client::AuditClient;
use mesh_db::Db;
use mesh_proto::audit::{Actor, AppendRequest, AuditEvent, Outcome, Resource, Source};
use mesh_runtime::grpc::CallContext;
use mesh_tower::Backoff;
use prost_types::{Struct, Value, value::Kind};
use tokio::{
    sync::{Semaphore, mpsc},
    task::JoinHandle,
};
use tonic::Code;
use tracing::Instrument as _;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use crate::{
    config::DataConfig,
    metrics::{Metrics, ResultLabels},
    store::{Origin, timestamp},
};

/// The `source.service` of every event (the audit service's idempotency scope).
pub const SOURCE_SERVICE: &str = "mesh-data";

/// Events handed from calls to the deliverers; beyond it, the sweep delivers.
const QUEUE: usize = 4096;

/// How often the outbox gauges (depth, age, dead) are refreshed.
const GAUGE_EVERY: Duration = Duration::from_secs(10);

/// One outbox row, as the audit service will get it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub(crate) struct Event {
    pub(crate) id: i64,
    pub(crate) idempotency_key: uuid::Uuid,
    pub(crate) occurred_at: DateTime<Utc>,
    pub(crate) action: String,
    pub(crate) collection: String,
    pub(crate) key: String,
    pub(crate) version: i64,
    pub(crate) op_index: i32,
    pub(crate) op_count: i32,
    /// Who wrote it, from which call.
    #[sqlx(flatten)]
    pub(crate) origin: Origin,
    /// Failed deliveries so far.
    pub(crate) attempts: i32,
}

fn string(s: impl Into<String>) -> Value {
    Value { kind: Some(Kind::StringValue(s.into())) }
}

fn number(n: i64) -> Value {
    Value { kind: Some(Kind::NumberValue(n as f64)) }
}

impl Event {
    /// The Append of this event.
    pub(crate) fn append_request(&self) -> AppendRequest {
        let mut metadata = Struct::default();
        metadata.fields.insert("collection".into(), string(&self.collection));
        metadata.fields.insert("key".into(), string(&self.key));
        metadata.fields.insert("version".into(), number(self.version));
        metadata.fields.insert("session_id".into(), string(&self.origin.session_id));
        if self.op_count > 1 {
            metadata.fields.insert("batch_index".into(), number(i64::from(self.op_index)));
            metadata.fields.insert("batch_size".into(), number(i64::from(self.op_count)));
        }
        AppendRequest {
            event: Some(AuditEvent {
                occurred_at: Some(timestamp(self.occurred_at)),
                actor: Some(Actor { r#type: "user".into(), id: self.origin.actor_id.clone() }),
                action: self.action.clone(),
                resource: Some(Resource {
                    r#type: "document".into(),
                    id: format!("{}/{}", self.collection, self.key),
                }),
                outcome: Outcome::Success as i32,
                source: Some(Source {
                    ip: self.origin.source_ip.clone(),
                    user_agent: self.origin.user_agent.clone(),
                    service: SOURCE_SERVICE.into(),
                }),
                request_id: self.origin.request_id.clone(),
                trace_id: self.origin.trace_id.clone(),
                metadata: Some(metadata),
                ..Default::default()
            }),
            idempotency_key: self.idempotency_key.to_string(),
        }
    }

    /// The trace the event belongs to (the write's), from its `traceparent`.
    fn parent(&self) -> opentelemetry::Context {
        let mut headers = http::HeaderMap::new();
        if let Ok(v) = http::HeaderValue::from_str(&self.origin.traceparent) {
            headers.insert("traceparent", v);
        }
        mesh_runtime::trace_context::extract(&headers)
    }
}

/// The outbox columns an [`Event`] is read from.
const COLUMNS: &str = "id, idempotency_key, occurred_at, action, collection, key, version, op_index, op_count, \
     actor_id, session_id, request_id, trace_id, traceparent, source_ip, user_agent, attempts";

/// What a delivery hands to the acknowledger.
#[derive(Debug)]
enum Done {
    Delivered(i64),
    Failed { id: i64, attempts: i32, error: String },
    Dead { id: i64, error: String },
}

/// A handle to hand events to the deliverers; cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct Outbox {
    queue: Option<mpsc::Sender<(Event, opentelemetry::Context)>>,
}

impl Outbox {
    /// An outbox nobody delivers from here (no audit service configured):
    /// events wait for an instance that has one.
    pub(crate) fn undelivered() -> Self {
        Self { queue: None }
    }

    /// Hands just-committed events to the deliverers, as children of the
    /// current span. A full queue leaves them to the sweep.
    pub(crate) fn hand_off(&self, events: Vec<Event>) {
        let Some(queue) = &self.queue else { return };
        let cx = tracing::Span::current().context();
        for e in events {
            if queue.try_send((e, cx.clone())).is_err() {
                tracing::debug!("audit hand-off queue full, the sweep delivers the rest");
                break;
            }
        }
    }
}

/// The delivery side (see the module docs).
#[derive(Debug)]
pub(crate) struct Deliverer {
    db: Db,
    audit: AuditClient,
    timeout: Duration,
    sweep: Duration,
    batch: i64,
    lease: Duration,
    backoff: Backoff,
    permits: Arc<Semaphore>,
    metrics: Arc<Metrics>,
}

impl Deliverer {
    /// Starts delivering; returns the handle calls use and the background tasks.
    pub(crate) fn start(
        db: Db,
        audit: AuditClient,
        c: &DataConfig,
        metrics: Arc<Metrics>,
    ) -> (Outbox, Vec<JoinHandle<()>>) {
        let this = Arc::new(Self {
            db,
            audit,
            timeout: c.audit_timeout,
            sweep: c.outbox_sweep,
            batch: c.outbox_batch as i64,
            lease: c.outbox_lease,
            backoff: Backoff::new(c.outbox_retry_base, c.outbox_retry_max),
            permits: Arc::new(Semaphore::new(c.outbox_concurrency)),
            metrics,
        });
        let (queue, handed) = mpsc::channel(QUEUE);
        // Bounded: a delivery holds its permit until its outcome is queued,
        // so when recording falls behind, deliveries wait instead of piling
        // outcomes up in memory.
        let (done_tx, done_rx) = mpsc::channel(QUEUE);
        let tasks = vec![
            tokio::spawn(this.clone().dispatch(handed, done_tx.clone())),
            tokio::spawn(this.clone().sweep_loop(done_tx)),
            tokio::spawn(this.acknowledge(done_rx)),
        ];
        (Outbox { queue: Some(queue) }, tasks)
    }

    /// Delivers handed-off events, at most `concurrency` at a time.
    async fn dispatch(
        self: Arc<Self>,
        mut handed: mpsc::Receiver<(Event, opentelemetry::Context)>,
        done: mpsc::Sender<Done>,
    ) {
        while let Some((event, cx)) = handed.recv().await {
            self.clone().spawn_delivery(event, cx, done.clone()).await;
        }
    }

    async fn spawn_delivery(
        self: Arc<Self>,
        event: Event,
        parent: opentelemetry::Context,
        done: mpsc::Sender<Done>,
    ) {
        let Ok(permit) = self.permits.clone().acquire_owned().await else { return };
        let span = tracing::info_span!(
            "audit delivery",
            otel.name = "deliver audit event",
            otel.kind = "internal",
            audit.idempotency_key = %event.idempotency_key,
            audit.attempt = event.attempts + 1,
        );
        let _ = span.set_parent(parent);
        tokio::spawn(
            async move {
                let _permit = permit;
                let _ = done.send(self.deliver(event).await).await;
            }
            .instrument(span),
        );
    }

    async fn deliver(&self, event: Event) -> Done {
        let mut req = tonic::Request::new(event.append_request());
        req.set_timeout(self.timeout);
        let request_id = if event.origin.request_id.is_empty() {
            uuid::Uuid::new_v4().to_string()
        } else {
            event.origin.request_id.clone()
        };
        // The write's request id travels with its event; the call's deadline does not.
        match CallContext::new(request_id, None).scope(self.audit.append(req)).await {
            Ok(_) => Done::Delivered(event.id),
            Err(s) if matches!(s.code(), Code::InvalidArgument | Code::OutOfRange) => {
                Done::Dead { id: event.id, error: s.message().to_owned() }
            }
            Err(s) => Done::Failed {
                id: event.id,
                attempts: event.attempts,
                error: format!("{:?}: {}", s.code(), s.message()),
            },
        }
    }

    /// Records outcomes: deletes delivered events in batches, reschedules
    /// failed ones, marks refused ones dead.
    async fn acknowledge(self: Arc<Self>, mut done: mpsc::Receiver<Done>) {
        let mut delivered = Vec::new();
        while let Some(first) = done.recv().await {
            let mut next = Some(first);
            while let Some(d) = next.take().or_else(|| done.try_recv().ok()) {
                match d {
                    Done::Delivered(id) => {
                        self.metrics.audit_events.get_or_create(&ResultLabels { result: "delivered" }).inc();
                        delivered.push(id);
                        if delivered.len() >= 1000 {
                            break;
                        }
                    }
                    Done::Failed { id, attempts, error } => {
                        self.metrics.audit_events.get_or_create(&ResultLabels { result: "failed" }).inc();
                        tracing::debug!(event = id, error = %error, "audit append failed, retrying later");
                        let wait = self.backoff.delay(attempts.max(0) as u32);
                        self.reschedule(id, wait, &error).await;
                    }
                    Done::Dead { id, error } => {
                        self.metrics
                            .audit_events
                            .get_or_create(&ResultLabels { result: "dead_lettered" })
                            .inc();
                        tracing::error!(
                            event = id,
                            error = %error,
                            "the audit service refused an event for good; it stays in the outbox, marked dead"
                        );
                        let r = sqlx::query(
                            "update audit_outbox set dead_at = now(), last_error = $2 where id = $1",
                        )
                        .bind(id)
                        .bind(&error)
                        .execute(self.db.primary())
                        .await;
                        if let Err(e) = r {
                            tracing::warn!(error = %e, "cannot mark an audit event dead");
                        }
                    }
                }
            }
            if !delivered.is_empty() {
                // Not deleted: delivered again later, answered by its key.
                let r = sqlx::query("delete from audit_outbox where id = any($1)")
                    .bind(&delivered)
                    .execute(self.db.primary())
                    .await;
                if let Err(e) = r {
                    tracing::warn!(error = %e, "cannot delete delivered audit events; they will be delivered again");
                }
                delivered.clear();
            }
        }
    }

    async fn reschedule(&self, id: i64, wait: Duration, error: &str) {
        let wait = sqlx::postgres::types::PgInterval::try_from(wait).unwrap_or_default();
        let r = sqlx::query(
            "update audit_outbox set next_attempt_at = now() + $2, attempts = attempts + 1, last_error = $3 \
             where id = $1",
        )
        .bind(id)
        .bind(wait)
        .bind(error)
        .execute(self.db.primary())
        .await;
        if let Err(e) = r {
            tracing::debug!(error = %e, "cannot reschedule an audit event; its lease runs out instead");
        }
    }

    async fn sweep_loop(self: Arc<Self>, done: mpsc::Sender<Done>) {
        let mut ticker = tokio::time::interval(self.sweep);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The gauges count the whole outbox: every 10 s, not every sweep.
        let mut last_gauge: Option<tokio::time::Instant> = None;
        loop {
            ticker.tick().await;
            if last_gauge.is_none_or(|t| t.elapsed() >= GAUGE_EVERY) {
                self.gauge().await;
                last_gauge = Some(tokio::time::Instant::now());
            }
            loop {
                let claimed = match self.claim().await {
                    Ok(events) => events,
                    Err(e) => {
                        tracing::debug!(error = %e, "cannot sweep the audit outbox");
                        break;
                    }
                };
                let full = claimed.len() as i64 >= self.batch;
                for e in claimed {
                    let parent = e.parent();
                    self.clone().spawn_delivery(e, parent, done.clone()).await;
                }
                if !full {
                    break;
                }
            }
        }
    }

    /// Claims due events for one lease.
    async fn claim(&self) -> Result<Vec<Event>, sqlx::Error> {
        let sql = format!(
            "update audit_outbox o set next_attempt_at = now() + $2 \
             where o.id in (select id from audit_outbox where dead_at is null and next_attempt_at <= now() \
                            order by next_attempt_at limit $1 for update skip locked) \
             returning {}",
            COLUMNS.split(", ").map(|c| format!("o.{c}")).collect::<Vec<_>>().join(", ")
        );
        let lease = sqlx::postgres::types::PgInterval::try_from(self.lease).unwrap_or_default();
        let rows: Vec<Event> =
            sqlx::query_as(&sql).bind(self.batch).bind(lease).fetch_all(self.db.primary()).await?;
        Ok(rows)
    }

    /// Depth, age of the oldest and dead events, for the metrics.
    async fn gauge(&self) {
        let r: Result<(i64, Option<f64>, i64), _> = sqlx::query_as(
            "select count(*) filter (where dead_at is null), \
                    extract(epoch from now() - min(occurred_at) filter (where dead_at is null))::float8, \
                    count(*) filter (where dead_at is not null) \
             from audit_outbox",
        )
        .fetch_one(self.db.primary())
        .await;
        if let Ok((depth, oldest, dead)) = r {
            self.metrics.outbox_depth.set(depth);
            self.metrics.outbox_oldest_seconds.set(oldest.unwrap_or(0.0).max(0.0) as i64);
            self.metrics.outbox_dead.set(dead);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_become_appends_scoped_to_the_data_service() {
        let e = Event {
            id: 7,
            idempotency_key: uuid::Uuid::nil(),
            occurred_at: DateTime::from_timestamp(1_700_000_000, 123_000_000).unwrap(),
            action: "document.put".into(),
            collection: "orders".into(),
            key: "o/17".into(),
            version: 3,
            op_index: 1,
            op_count: 2,
            origin: Origin {
                actor_id: "alice".into(),
                session_id: "ses_1".into(),
                request_id: "req-1".into(),
                trace_id: "0af7651916cd43dd8448eb211c80319c".into(),
                traceparent: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into(),
                source_ip: "10.0.0.1".into(),
                user_agent: "ua/1".into(),
            },
            attempts: 0,
        };
        let req = e.append_request();
        assert_eq!(req.idempotency_key, uuid::Uuid::nil().to_string());
        let ev = req.event.unwrap();
        assert_eq!(ev.resource.unwrap().id, "orders/o/17");
        assert_eq!(ev.source.unwrap().service, SOURCE_SERVICE);
        assert_eq!(
            ev.occurred_at.unwrap(),
            prost_types::Timestamp { seconds: 1_700_000_000, nanos: 123_000_000 }
        );
        let m = ev.metadata.unwrap();
        assert_eq!(m.fields["version"], number(3));
        assert_eq!(m.fields["batch_size"], number(2));
    }
}
