//! The gRPC API: parse at the edge, call in, map errors once.

use std::{pin::Pin, sync::Arc};

use futures::{Stream, StreamExt as _};
use mesh_db::Db;
use mesh_proto::audit::{
    AppendRequest, AppendResponse, ExportRequest, ExportResponse, QueryRequest, QueryResponse, TailRequest,
    VerifyRequest, VerifyResponse, audit_service_server::AuditService,
};
use mesh_runtime::{AdminGuard, grpc::request_id_of};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, metadata::MetadataValue};

use crate::{
    appender::Appender,
    config::AuditConfig,
    domain::{self, CallContext, PageToken},
    error::Error,
    export, store,
    tail::{Hub, TailStream},
    verify,
};

/// `Verify`, an admin RPC ([`mesh_runtime::authz`]).
pub(crate) const VERIFY: &str = "/mesh.audit.v1.AuditService/Verify";
/// `Export`, an admin RPC ([`mesh_runtime::authz`]).
pub(crate) const EXPORT: &str = "/mesh.audit.v1.AuditService/Export";

/// Response metadata naming where a read was served.
const SERVED_BY: &str = "x-mesh-served-by";

/// The gRPC API.
#[derive(Debug, Clone)]
pub(crate) struct Api {
    db: Db,
    appender: Appender,
    hub: Hub,
    config: Arc<AuditConfig>,
    draining: CancellationToken,
    /// Who may Verify and Export; whom an Append speaks for.
    admin: AdminGuard,
}

impl Api {
    pub(crate) fn new(
        db: Db,
        appender: Appender,
        hub: Hub,
        config: AuditConfig,
        draining: CancellationToken,
        admin: AdminGuard,
    ) -> Self {
        Self { db, appender, hub, config: Arc::new(config), draining, admin }
    }
}

fn call_context<T>(req: &Request<T>) -> CallContext {
    CallContext {
        request_id: request_id_of(req).map(|r| r.to_string()),
        trace_id: req
            .metadata()
            .get("traceparent")
            .and_then(|v| v.to_str().ok())
            .and_then(domain::trace_id_of_traceparent),
    }
}

#[tonic::async_trait]
impl AuditService for Api {
    type TailStream = TailStream;
    type ExportStream = Pin<Box<dyn Stream<Item = Result<ExportResponse, Status>> + Send>>;

    async fn append(&self, req: Request<AppendRequest>) -> Result<Response<AppendResponse>, Status> {
        let call = call_context(&req);
        // Under TLS the source is the caller's certificate identity, not the
        // field: it also scopes the idempotency key.
        let attested = self.admin.attested(&req)?;
        let mut command = domain::parse_append(
            req.into_inner(),
            self.config.clock.now(),
            self.config.max_future_skew,
            &call,
        )?;
        if let Some(id) = attested {
            command.event.source_service = id.0;
        }
        let done = self.appender.append(command).await?;
        tracing::debug!(sequence = done.sequence, deduplicated = done.deduplicated, "appended");
        Ok(Response::new(AppendResponse {
            id: done.id.to_string(),
            sequence: done.sequence,
            hash: done.hash.to_vec(),
        }))
    }

    async fn query(&self, req: Request<QueryRequest>) -> Result<Response<QueryResponse>, Status> {
        let q = domain::parse_query(req.into_inner())?;
        let reader = self.db.reader();
        // One more than asked: a full page has a next page only if that one exists.
        let mut events = store::query_page(&reader.pool, &q.filter, q.after, q.page_size + 1).await?;
        let next_page_token = if events.len() > q.page_size {
            events.truncate(q.page_size);
            let last = events.last().expect("a full page");
            PageToken { occurred_at: last.occurred_at, sequence: last.sequence }.encode(&q.filter)
        } else {
            String::new()
        };
        let mut resp = Response::new(QueryResponse {
            events: events.iter().map(domain::event_to_proto).collect(),
            next_page_token,
        });
        resp.metadata_mut().insert(SERVED_BY, MetadataValue::from_static(reader.served_by.as_str()));
        Ok(resp)
    }

    async fn tail(&self, req: Request<TailRequest>) -> Result<Response<Self::TailStream>, Status> {
        let req = req.into_inner();
        let filter = domain::parse_filter(req.filter, "filter")?;
        // Refused before any work once the instance serves its most streams.
        let admission = self.hub.admit()?;
        let head = store::read_head(self.db.primary()).await.map_err(Error::from)?.last();
        let cursor = match req.after_sequence {
            None => head,
            Some(after) if after > head => {
                return Err(
                    Error::OutOfRange(format!("after_sequence {after} is beyond the head, {head}")).into()
                );
            }
            Some(after) => after,
        };
        let stream = self.hub.subscribe(
            admission,
            self.db.clone(),
            filter,
            cursor,
            self.config.tail_subscriber_buffer,
            self.draining.clone(),
        );
        Ok(Response::new(stream))
    }

    async fn verify(&self, req: Request<VerifyRequest>) -> Result<Response<VerifyResponse>, Status> {
        self.admin.check(&req, VERIFY)?;
        let req = req.into_inner();
        let mut range = domain::parse_range(req.from_sequence, req.to_sequence)?;
        // "To the head" means the primary's head; a replica serves the read
        // only if it has replayed that far.
        let to = match range.to {
            Some(to) => to,
            None => store::read_head(self.db.primary()).await.map_err(Error::from)?.last(),
        };
        range.to = Some(to);
        let pool = store::covering(&self.db, to).await.map_err(Error::from)?;
        let report = verify::verify(&pool, range, self.config.scan_chunk).await?;
        if !report.ok {
            tracing::warn!(
                first_bad_sequence = report.first_bad_sequence,
                problem = report.problem.as_deref().unwrap_or_default(),
                "audit chain verification failed"
            );
        }
        Ok(Response::new(VerifyResponse {
            ok: report.ok,
            checked: report.checked,
            first_bad_sequence: report.first_bad_sequence,
            head_hash: report.head_hash.to_vec(),
            problem: report.problem.unwrap_or_default(),
        }))
    }

    async fn export(&self, req: Request<ExportRequest>) -> Result<Response<Self::ExportStream>, Status> {
        self.admin.check(&req, EXPORT)?;
        let req = req.into_inner();
        let filter = domain::parse_filter(req.filter, "filter")?;
        let range = domain::parse_range(req.from_sequence, req.to_sequence)?;
        let (pool, from, to) = export::plan(&self.db, range).await?;
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(export::run(pool, filter, from, to, self.config.scan_chunk, tx));
        let stream = ReceiverStream::new(rx).map(|r| {
            r.map(|c| ExportResponse { lines: c.lines, last_sequence: c.last_sequence }).map_err(Status::from)
        });
        Ok(Response::new(Box::pin(stream)))
    }
}
