//! The gRPC API: every call is authenticated and rate limited (`guard`),
//! parsed (`request`), then served by `store`; writes hand their audit
//! events to the `outbox` deliverers once committed.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use mesh_db::{Db, ServedBy};
use mesh_proto::data::{
    BatchRequest, BatchResponse, BatchResult, DeleteRequest, DeleteResponse, GetRequest, GetResponse,
    PutRequest, PutResponse, QueryRequest, QueryResponse, data_service_server::DataService,
};
use mesh_runtime::grpc::CallContext;
use tonic::{Request, Response, Status, metadata::MetadataValue};

use crate::{
    config::DataConfig,
    error::Error,
    guard::{Caller, Guard},
    metrics::{Metrics, OpLabels},
    outbox::{Event, Outbox},
    request::{self, Op, Write},
    store::{self, Origin, Written},
    token,
};

/// Response metadata naming where a call was served.
pub const SERVED_BY: &str = "x-mesh-served-by";

/// Longest user agent recorded in an audit event (the audit service's limit).
const MAX_USER_AGENT: usize = 1024;

/// The gRPC API.
#[derive(Debug, Clone)]
pub(crate) struct Api {
    db: Db,
    guard: Guard,
    outbox: Outbox,
    max_batch_ops: usize,
    grace: Duration,
    metrics: Arc<Metrics>,
}

fn respond<T>(body: T, served_by: ServedBy) -> Response<T> {
    let mut r = Response::new(body);
    r.metadata_mut().insert(SERVED_BY, MetadataValue::from_static(served_by.as_str()));
    r
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Collection → operations, for the rate limiter.
fn hits<'a>(writes: impl IntoIterator<Item = &'a Write>) -> BTreeMap<&'a str, u32> {
    let mut hits = BTreeMap::new();
    for w in writes {
        *hits.entry(w.collection.as_str()).or_insert(0) += 1;
    }
    hits
}

/// Who wrote, from the call: its caller, request id, trace and origin.
fn origin<T>(req: &Request<T>, caller: &Caller) -> Origin {
    let mut headers = http::HeaderMap::new();
    mesh_runtime::trace_context::inject_current(&mut headers);
    let header =
        |h: &http::HeaderMap, k: &str| h.get(k).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
    let user_agent = req.metadata().get("user-agent").and_then(|v| v.to_str().ok()).unwrap_or("");
    Origin {
        actor_id: caller.user_id.clone(),
        session_id: caller.session_id.clone(),
        request_id: CallContext::current().map(|c| c.request_id().to_owned()).unwrap_or_default(),
        trace_id: mesh_runtime::trace_context::current_trace_id().unwrap_or_default(),
        traceparent: header(&headers, "traceparent"),
        source_ip: req.remote_addr().map(|a| a.ip().to_canonical().to_string()).unwrap_or_default(),
        user_agent: truncate(user_agent, MAX_USER_AGENT).to_owned(),
    }
}

impl Api {
    pub(crate) fn new(db: Db, guard: Guard, outbox: Outbox, c: &DataConfig, metrics: Arc<Metrics>) -> Self {
        Self { db, guard, outbox, max_batch_ops: c.max_batch_ops, grace: c.outbox_grace, metrics }
    }

    /// Commits `writes` with their audit events, then hands the events to
    /// the deliverers.
    async fn write(&self, writes: &[Write], origin: Origin, batch: bool) -> Result<Written, Error> {
        let keys: Vec<uuid::Uuid> = writes.iter().map(|_| uuid::Uuid::new_v4()).collect();
        let written = match store::write(&self.db, writes, &keys, &origin, self.grace, batch).await {
            Err(e @ Error::Conflict(_)) => {
                self.metrics.conflicts.inc();
                return Err(e);
            }
            r => r?,
        };
        let n = writes.len() as i32;
        let mut events = Vec::new();
        for (i, w) in writes.iter().enumerate() {
            let (Some(id), Some(version)) = (written.outbox[i], written.versions[i]) else { continue };
            let op = if matches!(w.op, Op::Delete) { "delete" } else { "put" };
            self.metrics.writes.get_or_create(&OpLabels { op }).inc();
            events.push(Event {
                id,
                idempotency_key: keys[i],
                occurred_at: written.at,
                action: format!("document.{op}"),
                collection: w.collection.as_str().to_owned(),
                key: w.key.as_str().to_owned(),
                version: version as i64,
                op_index: i as i32,
                op_count: n,
                origin: origin.clone(),
                attempts: 0,
            });
        }
        self.outbox.hand_off(events);
        Ok(written)
    }
}

#[tonic::async_trait]
impl DataService for Api {
    async fn put(&self, req: Request<PutRequest>) -> Result<Response<PutResponse>, Status> {
        let caller = self.guard.authenticate(req.metadata()).await?;
        let origin = origin(&req, &caller);
        let w = request::put(req.into_inner())?;
        self.guard.admit(&caller, &hits([&w])).await?;
        let written = self.write(std::slice::from_ref(&w), origin, false).await?;
        let version = written.versions[0].unwrap_or_default();
        let body = PutResponse { version, consistency_token: token::consistency(written.lsn) };
        Ok(respond(body, ServedBy::Primary))
    }

    async fn get(&self, req: Request<GetRequest>) -> Result<Response<GetResponse>, Status> {
        let caller = self.guard.authenticate(req.metadata()).await?;
        let g = request::get(req.into_inner())?;
        self.guard.admit(&caller, &BTreeMap::from([(g.collection.as_str(), 1)])).await?;
        let read = store::get(&self.db, &g).await?;
        let Some(found) = read.value else {
            let mut status = Status::from(Error::NotFound {
                collection: g.collection.as_str().to_owned(),
                key: g.key.as_str().to_owned(),
            });
            // Where "not found" was decided matters as much as where a document was.
            status.metadata_mut().insert(SERVED_BY, MetadataValue::from_static(read.served_by.as_str()));
            return Err(status);
        };
        let body = GetResponse {
            document: Some(found.document),
            version: found.version,
            updated_at: Some(store::timestamp(found.updated_at)),
        };
        Ok(respond(body, read.served_by))
    }

    async fn delete(&self, req: Request<DeleteRequest>) -> Result<Response<DeleteResponse>, Status> {
        let caller = self.guard.authenticate(req.metadata()).await?;
        let origin = origin(&req, &caller);
        let w = request::delete(req.into_inner())?;
        self.guard.admit(&caller, &hits([&w])).await?;
        let written = self.write(std::slice::from_ref(&w), origin, false).await?;
        let body = DeleteResponse {
            consistency_token: token::consistency(written.lsn),
            existed: written.versions[0].is_some(),
        };
        Ok(respond(body, ServedBy::Primary))
    }

    async fn query(&self, req: Request<QueryRequest>) -> Result<Response<QueryResponse>, Status> {
        let caller = self.guard.authenticate(req.metadata()).await?;
        let q = request::query(req.into_inner())?;
        self.guard.admit(&caller, &BTreeMap::from([(q.collection.as_str(), 1)])).await?;
        let read = store::query(&self.db, &q).await?;
        let (documents, last) = read.value;
        let body = QueryResponse {
            documents,
            next_page_token: last.map(|k| token::page(&q.hash, &k)).unwrap_or_default(),
        };
        Ok(respond(body, read.served_by))
    }

    async fn batch(&self, req: Request<BatchRequest>) -> Result<Response<BatchResponse>, Status> {
        let caller = self.guard.authenticate(req.metadata()).await?;
        let origin = origin(&req, &caller);
        let writes = request::batch(req.into_inner(), self.max_batch_ops)?;
        self.guard.admit(&caller, &hits(&writes)).await?;
        let written = self.write(&writes, origin, true).await?;
        let results = writes
            .iter()
            .zip(&written.versions)
            .map(|(w, v)| match w.op {
                Op::Put(_) => BatchResult { version: v.unwrap_or_default(), existed: false },
                Op::Delete => BatchResult { version: 0, existed: v.is_some() },
            })
            .collect();
        let body = BatchResponse { results, consistency_token: token::consistency(written.lsn) };
        Ok(respond(body, ServedBy::Primary))
    }
}
