//! The gRPC API: requests are parsed (`request`), rate limited (`limiter`),
//! answered from the cache or Redis (`cache`, `store`); every error goes
//! through the one mapping in `error`.

use std::{sync::Arc, time::Duration};

use mesh_proto::session::{
    self as pb, CreateSessionRequest, CreateSessionResponse, ListUserSessionsRequest,
    ListUserSessionsResponse, RefreshSessionRequest, RefreshSessionResponse, RevokeSessionRequest,
    RevokeSessionResponse, RevokeUserSessionsRequest, RevokeUserSessionsResponse, ValidateSessionRequest,
    ValidateSessionResponse, session_service_server::SessionService,
};
use mesh_runtime::AdminGuard;
use prometheus_client::metrics::counter::Counter;
use tokio::time::Instant;
use tonic::{Request, Response, Status};

use crate::{
    cache::{Cache, Entry},
    config::SessionConfig,
    error::Error,
    limiter::Limiter,
    metrics::{Metrics, ReasonLabels, ValidationLabels},
    request::{self, Client, RevokeTarget},
    store::{AuditContext, Record, Store, StoreError},
    token::{Bucket, SessionId, Token, TokenHash},
};

/// `RevokeUserSessions`, an admin RPC ([`mesh_runtime::authz`]).
pub(crate) const REVOKE_USER_SESSIONS: &str = "/mesh.session.v1.SessionService/RevokeUserSessions";
/// `ListUserSessions`, an admin RPC ([`mesh_runtime::authz`]).
pub(crate) const LIST_USER_SESSIONS: &str = "/mesh.session.v1.SessionService/ListUserSessions";

/// What a validation found without Redis.
enum Local {
    Hit(Arc<pb::Session>),
    Miss(Bucket, TokenHash),
}

/// The gRPC API.
#[derive(Debug, Clone)]
pub(crate) struct Api {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    store: Store,
    cache: Arc<Cache>,
    limiter: Limiter,
    config: SessionConfig,
    metrics: Arc<Metrics>,
    /// Who may call the admin RPCs.
    admin: AdminGuard,
    // The per-call counters, looked up once.
    invalid_format: Counter,
    valid_from_cache: Counter,
}

fn timestamp(ms: i64) -> Option<prost_types::Timestamp> {
    Some(prost_types::Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: (ms.rem_euclid(1000) * 1_000_000) as i32,
    })
}

fn millis(ms: i64) -> Duration {
    Duration::from_millis(ms.max(0) as u64)
}

/// The API's view of a stored session.
fn session(r: &Record) -> pb::Session {
    pb::Session {
        id: r.id.clone(),
        user_id: r.user_id.clone(),
        attributes: serde_json::from_str(&r.attributes_json).unwrap_or_default(),
        client: Some(pb::ClientInfo { ip: r.ip.clone(), user_agent: r.user_agent.clone() }),
        created_at: timestamp(r.created_ms),
        last_seen_at: timestamp(r.last_seen_ms),
        idle_expires_at: timestamp(r.idle_expires_ms),
        absolute_expires_at: timestamp(r.absolute_expires_ms),
    }
}

fn unavailable(e: StoreError) -> Error {
    tracing::warn!(error = %e, "session store unavailable");
    Error::Unavailable("session store unavailable, try again".to_owned())
}

/// Who is asking, for the audit events of a change.
fn audit_context<T>(req: &Request<T>, client: Client) -> AuditContext {
    AuditContext {
        request_id: mesh_runtime::grpc::request_id_of(req).map(|r| r.to_string()).unwrap_or_default(),
        trace_id: mesh_runtime::trace_context::current_trace_id().unwrap_or_default(),
        client,
    }
}

impl Api {
    pub(crate) fn new(
        store: Store,
        cache: Arc<Cache>,
        limiter: Limiter,
        config: SessionConfig,
        metrics: Arc<Metrics>,
        admin: AdminGuard,
    ) -> Self {
        let counter =
            |result, source| metrics.validations.get_or_create(&ValidationLabels { result, source }).clone();
        let invalid_format = counter("invalid", "format");
        let valid_from_cache = counter("valid", "cache");
        Self {
            inner: Arc::new(Inner {
                store,
                cache,
                limiter,
                config,
                metrics,
                admin,
                invalid_format,
                valid_from_cache,
            }),
        }
    }
}

impl Api {
    /// Validates (and with `touch` slides the idle expiry of) a token: the
    /// one validation path, for ValidateSession and Envoy's ext_authz Check
    /// (`authz`). UNAUTHENTICATED for a malformed, unknown, expired or
    /// revoked token, UNAVAILABLE while Redis cannot answer.
    pub(crate) async fn validate_token(&self, token: &str, touch: bool) -> Result<Arc<pb::Session>, Error> {
        Ok(match self.inner.validate_locally(token, touch)? {
            Local::Hit(s) => s,
            Local::Miss(bucket, h) => Arc::new(Box::pin(self.inner.validate(bucket, h, touch)).await?),
        })
    }
}

impl Inner {
    fn touch_interval(&self, idle_timeout_ms: i64) -> Duration {
        self.config.touch_interval.min(millis(idle_timeout_ms / 16))
    }

    /// Caches a session read by a request sent at `sent` (see `cache`).
    fn remember(&self, generation: u64, h: TokenHash, r: &Record, s: &pb::Session, sent: Instant) {
        if !self.cache.configured() {
            return;
        }
        let entry = Entry::new(
            s.clone(),
            sent,
            millis(r.remaining_ms()),
            millis(r.now_ms - r.last_seen_ms),
            self.touch_interval(r.idle_timeout_ms),
            self.config.cache_ttl,
        );
        self.cache.insert(generation, h, entry);
    }

    fn ended(&self, reason: &'static str, n: usize) {
        if n > 0 {
            self.metrics.ended.get_or_create(&ReasonLabels { reason }).inc_by(n as u64);
        }
    }

    fn validated(&self, result: &'static str, source: &'static str) {
        self.metrics.validations.get_or_create(&ValidationLabels { result, source }).inc();
    }

    /// The cheap part of a validation: the token's shape, then the cache.
    /// Kept apart from [`Inner::validate`], so the future of a cache hit
    /// stays small (the Redis path's is large, and futures are moved).
    fn validate_locally(&self, token: &str, touch: bool) -> Result<Local, Error> {
        let (bucket, h) = request::token(token).inspect_err(|_| {
            self.invalid_format.inc();
        })?;
        let now = Instant::now();
        if let Some(e) = self.cache.get(&h, now)
            && (!touch || !e.touch_due(now))
        {
            self.valid_from_cache.inc();
            return Ok(Local::Hit(e.session));
        }
        Ok(Local::Miss(bucket, h))
    }

    async fn validate(&self, bucket: Bucket, h: TokenHash, touch: bool) -> Result<pb::Session, Error> {
        let generation = self.cache.generation();
        let sent = Instant::now();
        match self.store.validate(bucket, &h, touch, self.config.touch_interval).await {
            Ok(Some(r)) => {
                self.validated("valid", "redis");
                let s = session(&r);
                self.remember(generation, h, &r, &s, sent);
                Ok(s)
            }
            Ok(None) => {
                self.validated("invalid", "redis");
                Err(Error::Unauthenticated)
            }
            Err(e) => {
                self.validated("unavailable", "redis");
                Err(unavailable(e))
            }
        }
    }
}

#[tonic::async_trait]
impl SessionService for Api {
    async fn create_session(
        &self,
        req: Request<CreateSessionRequest>,
    ) -> Result<Response<CreateSessionResponse>, Status> {
        let me = &self.inner;
        let (metadata, extensions, body) = req.into_parts();
        let req = Request::from_parts(metadata, extensions, ());
        let new = request::create(body, &me.config)?;
        me.limiter.check(&new.user_id, &new.client.ip).await?;
        let bucket = new.user_id.bucket();
        let (token, id) = (Token::generate(bucket), SessionId::generate(bucket));
        let h = token.hash();
        let ctx = audit_context(&req, new.client.clone());
        let sent = Instant::now();
        let changed =
            me.store.create(&new, &id, &h, me.config.max_per_user, &ctx).await.map_err(unavailable)?;
        // Before answering: this instance never serves an evicted token again.
        me.cache.invalidate(&changed.revoked);
        me.ended("evict", changed.revoked.len());
        me.metrics.created.inc();
        let s = session(&changed.value);
        // Nobody else knows the new token: no invalidation can concern it.
        me.remember(me.cache.generation(), h, &changed.value, &s, sent);
        tracing::debug!(session = %s.id, evicted = changed.revoked.len(), "session created");
        Ok(Response::new(CreateSessionResponse { token: token.expose().to_owned(), session: Some(s) }))
    }

    async fn validate_session(
        &self,
        req: Request<ValidateSessionRequest>,
    ) -> Result<Response<ValidateSessionResponse>, Status> {
        let r = req.into_inner();
        let s = self.validate_token(&r.token, r.touch).await?;
        Ok(Response::new(ValidateSessionResponse { session: Some(Arc::unwrap_or_clone(s)) }))
    }

    async fn refresh_session(
        &self,
        req: Request<RefreshSessionRequest>,
    ) -> Result<Response<RefreshSessionResponse>, Status> {
        let me = &self.inner;
        let (metadata, extensions, body) = req.into_parts();
        let req = Request::from_parts(metadata, extensions, ());
        let ((bucket, old), client) = request::refresh(body)?;
        let token = Token::generate(bucket);
        let h = token.hash();
        let ctx = audit_context(&req, client);
        let sent = Instant::now();
        let r = me.store.refresh(bucket, &old, &h, &ctx).await.map_err(unavailable)?;
        let Some(r) = r else {
            return Err(Error::Unauthenticated.into());
        };
        me.cache.invalidate(&[old]);
        me.ended("refresh", 1);
        let s = session(&r);
        me.remember(me.cache.generation(), h, &r, &s, sent);
        tracing::debug!(session = %s.id, "session token rotated");
        Ok(Response::new(RefreshSessionResponse { token: token.expose().to_owned(), session: Some(s) }))
    }

    async fn revoke_session(
        &self,
        req: Request<RevokeSessionRequest>,
    ) -> Result<Response<RevokeSessionResponse>, Status> {
        let me = &self.inner;
        let (metadata, extensions, body) = req.into_parts();
        let req = Request::from_parts(metadata, extensions, ());
        let (target, client) = request::revoke(body)?;
        let ctx = audit_context(&req, client);
        let revoked = match &target {
            RevokeTarget::Id(id) => me.store.revoke_id(id, &ctx).await,
            RevokeTarget::Token(Some((bucket, h))) => {
                // Whatever Redis says, this token is not served from here again.
                me.cache.invalidate(&[*h]);
                me.store.revoke_token(*bucket, h, &ctx).await
            }
            RevokeTarget::Token(None) => Ok(None),
        }
        .map_err(unavailable)?;
        if let Some(h) = revoked {
            me.cache.invalidate(&[h]);
            me.ended("revoke", 1);
        }
        Ok(Response::new(RevokeSessionResponse { revoked: revoked.is_some() }))
    }

    async fn revoke_user_sessions(
        &self,
        req: Request<RevokeUserSessionsRequest>,
    ) -> Result<Response<RevokeUserSessionsResponse>, Status> {
        let me = &self.inner;
        me.admin.check(&req, REVOKE_USER_SESSIONS)?;
        let (metadata, extensions, body) = req.into_parts();
        let req = Request::from_parts(metadata, extensions, ());
        let r = request::revoke_user(body)?;
        let ctx = audit_context(&req, r.client.clone());
        let changed = me.store.revoke_user(&r.user_id, r.except.as_ref(), &ctx).await.map_err(unavailable)?;
        me.cache.invalidate(&changed.revoked);
        me.ended("revoke_all", changed.revoked.len());
        Ok(Response::new(RevokeUserSessionsResponse { revoked: changed.value }))
    }

    async fn list_user_sessions(
        &self,
        req: Request<ListUserSessionsRequest>,
    ) -> Result<Response<ListUserSessionsResponse>, Status> {
        self.inner.admin.check(&req, LIST_USER_SESSIONS)?;
        let user = request::list(req.into_inner())?;
        let records = self.inner.store.list(&user).await.map_err(unavailable)?;
        Ok(Response::new(ListUserSessionsResponse { sessions: records.iter().map(session).collect() }))
    }
}
