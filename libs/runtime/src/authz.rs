//! Authorization of admin RPCs (ratelimit `Reset`, session
//! `RevokeUserSessions` / `ListUserSessions`, audit `Verify` / `Export`):
//! the one check every service runs at the top of each of them.
//!
//! # Who may call them
//! `MESH_ADMIN_IDENTITIES` lists the caller identities ([`CallerIdentity`],
//! the `spiffe://` URI of the caller's TLS client certificate) allowed:
//!
//! | TLS | `MESH_ADMIN_IDENTITIES` | admin RPCs |
//! |-----|-------------------------|------------|
//! | on  | set                     | only the listed identities (`,` alone: nobody) |
//! | on  | unset                   | nobody |
//! | off | unset                   | every caller: local development, warned at start |
//! | off | set                     | nobody (without TLS no caller has an identity), warned at start |
//!
//! # A refusal
//! Is `PERMISSION_DENIED`, naming the RPC and why (the caller's own identity
//! at most: no token, no request field), counted in
//! `mesh_authz_denied_total{grpc_service,grpc_method}`, logged (at most one
//! warning a second, with how many were suppressed), and audited: an
//! `authz.denied` event (outcome DENIED, actor the caller's identity or
//! `anonymous`, resource `rpc` named by the method path) handed to the
//! service's [`AuditSink`]. Delivery happens in the background, at most
//! [`MAX_AUDITS_IN_FLIGHT`] at once, each within [`AUDIT_TIMEOUT`], so a
//! refused caller never waits on the audit service; each outcome is counted
//! in `mesh_authz_denial_audits_total{result}` (`appended`, `failed`:
//! refused, timed out or unreachable, logged; `dropped`: too many in
//! flight). A failed delivery is not retried later (the client stack's
//! retries aside): a denial changes nothing, so there is no change for its
//! event to stay atomic with. A service without an audit sink (no
//! `MESH_AUDIT_ADDR`) only logs and counts its denials.

use std::{
    collections::BTreeSet,
    sync::Arc,
    time::{Duration, SystemTime},
};

use futures::future::BoxFuture;
use mesh_proto::audit::{Actor, AppendRequest, AuditEvent, Outcome, Resource, Source};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};
use tokio::sync::Semaphore;
use tonic::{Request, Status};

use crate::{CallerIdentity, ConfigError, Lookup, LookupExt, Throttle, config::Var, identity::caller};

/// The variable [`AdminIdentities::from_lookup`] reads.
pub mod keys {
    /// Comma-separated caller identities (`spiffe://` URIs) allowed to call admin RPCs.
    pub const ADMIN_IDENTITIES: &str = "MESH_ADMIN_IDENTITIES";
}

/// The `action` of a denial's audit event.
pub const DENIED_ACTION: &str = "authz.denied";

/// Denial audit events being delivered at once; more are dropped (counted).
pub const MAX_AUDITS_IN_FLIGHT: usize = 64;

/// Longest one denial's audit delivery may take.
pub const AUDIT_TIMEOUT: Duration = Duration::from_secs(10);

/// `MESH_ADMIN_IDENTITIES`: `None` when unset (or empty), else the listed
/// identities (possibly none, e.g. `,`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AdminIdentities(pub Option<BTreeSet<String>>);

impl AdminIdentities {
    /// Reads `MESH_ADMIN_IDENTITIES`. Every item must be a `spiffe://` URI
    /// (a typo would otherwise silently never match): else a
    /// [`ConfigError`] naming the variable and the bad item.
    pub fn from_lookup(l: &(impl Lookup + ?Sized)) -> Result<Self, ConfigError> {
        let Some(raw) = l.string(keys::ADMIN_IDENTITIES) else {
            return Ok(Self(None));
        };
        let mut set = BTreeSet::new();
        for id in crate::config::split_list(&raw) {
            if !id.starts_with("spiffe://")
                || id.len() <= "spiffe://".len()
                || id.contains(char::is_whitespace)
            {
                return Err(ConfigError::new(
                    keys::ADMIN_IDENTITIES,
                    format!("{id:?} is not a spiffe:// URI (e.g. spiffe://mesh.local/ns/default/sa/ops)"),
                ));
            }
            set.insert(id);
        }
        Ok(Self(Some(set)))
    }

    /// Its `--help` line.
    pub fn var() -> Var {
        Var::unset(
            keys::ADMIN_IDENTITIES,
            "with TLS, nobody may call admin RPCs; without TLS (local development), everybody may (warned \
             at start)",
            "comma-separated caller identities (spiffe:// URIs of client certificates, e.g. \
             spiffe://mesh.local/ns/default/sa/ops) allowed to call admin RPCs (ratelimit Reset, session \
             RevokeUserSessions and ListUserSessions, audit Verify and Export); when set, a caller without \
             TLS has no identity and is refused; refusals are PERMISSION_DENIED and audited",
        )
    }
}

/// Why a caller was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// It has an identity that is not listed (or nothing is listed).
    NotListed,
    /// It has no identity: no TLS, or a certificate without a `spiffe://` URI.
    NoIdentity,
}

/// The decision itself: may `caller` call an admin RPC, given the listed
/// identities (`None`: unset) and whether the server runs TLS? (The table
/// in the module docs.)
pub fn decide(admins: &AdminIdentities, tls: bool, caller: Option<&CallerIdentity>) -> Result<(), Refusal> {
    match (&admins.0, caller) {
        (None, _) if !tls => Ok(()),
        (Some(set), Some(id)) if set.contains(id.as_str()) => Ok(()),
        (_, Some(_)) => Err(Refusal::NotListed),
        (_, None) => Err(Refusal::NoIdentity),
    }
}

/// Delivers one denial's audit event (an Append with an idempotency key);
/// `Err` is logged and counted. The session and rate-limit services append
/// through `mesh_client::AuditClient`, the audit service to its own log.
pub type AuditSink = Arc<dyn Fn(AppendRequest) -> BoxFuture<'static, Result<(), Status>> + Send + Sync>;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabels {
    grpc_service: String,
    grpc_method: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

/// The admin check of one server (see the module docs). Cheap to clone.
#[derive(Clone)]
pub struct AdminGuard {
    inner: Arc<Inner>,
}

struct Inner {
    admins: AdminIdentities,
    tls: bool,
    /// `source.service` of the denial events (the recording service).
    source_service: &'static str,
    denied: Family<MethodLabels, Counter>,
    audits: Family<ResultLabels, Counter>,
    sink: Option<AuditSink>,
    in_flight: Arc<Semaphore>,
    log: Throttle,
}

impl std::fmt::Debug for AdminGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminGuard")
            .field("admins", &self.inner.admins)
            .field("tls", &self.inner.tls)
            .field("audited", &self.inner.sink.is_some())
            .finish()
    }
}

/// `(service, method)` of a `/package.Service/Method` path.
fn split_path(path: &str) -> (&str, &str) {
    path.trim_start_matches('/').split_once('/').unwrap_or(("", path))
}

impl AdminGuard {
    /// The check for a server configured by `server` (its
    /// `MESH_ADMIN_IDENTITIES`, and whether it runs TLS): see
    /// [`Self::with_policy`].
    pub fn new(
        server: &crate::ServerConfig,
        source_service: &'static str,
        methods: &[&str],
        sink: Option<AuditSink>,
        registry: &mut Registry,
    ) -> Self {
        let tls = server.tls.is_some();
        Self::with_policy(server.admin_identities.clone(), tls, source_service, methods, sink, registry)
    }

    /// The check for a server that runs TLS or not (`tls`), recording as
    /// `source_service` (e.g. `mesh-ratelimit`), with its metrics in
    /// `registry`: `methods` (full paths, `/package.Service/Method`) start at
    /// 0 in `mesh_authz_denied_total`. `sink`: where denials are audited
    /// (`None`: logged and counted only). Logs at start what the
    /// configuration means when it is not "only the listed identities".
    pub fn with_policy(
        admins: AdminIdentities,
        tls: bool,
        source_service: &'static str,
        methods: &[&str],
        sink: Option<AuditSink>,
        registry: &mut Registry,
    ) -> Self {
        let denied = Family::<MethodLabels, Counter>::default();
        let audits = Family::<ResultLabels, Counter>::default();
        registry.register(
            "mesh_authz_denied",
            "Admin RPCs refused with PERMISSION_DENIED (caller not in MESH_ADMIN_IDENTITIES, or without identity)",
            denied.clone(),
        );
        registry.register(
            "mesh_authz_denial_audits",
            "Audit events of refused admin RPCs, by delivery result (appended, failed, dropped)",
            audits.clone(),
        );
        for m in methods {
            let (s, m) = split_path(m);
            let _ =
                denied.get_or_create(&MethodLabels { grpc_service: s.to_owned(), grpc_method: m.to_owned() });
        }
        for result in ["appended", "failed", "dropped"] {
            let _ = audits.get_or_create(&ResultLabels { result });
        }
        let key = keys::ADMIN_IDENTITIES;
        match (&admins.0, tls) {
            (None, false) => tracing::warn!(
                "{key} is not set and TLS is off: every caller may call admin RPCs (local development only)"
            ),
            (None, true) => tracing::warn!("{key} is not set: admin RPCs are refused to every caller"),
            (Some(_), false) => tracing::warn!(
                "{key} is set but TLS is off: without TLS no caller has an identity, admin RPCs are refused"
            ),
            (Some(set), true) if set.is_empty() => {
                tracing::warn!("{key} lists nobody: admin RPCs are refused to every caller")
            }
            (Some(set), true) => tracing::info!(admins = set.len(), "admin RPCs allowed to {key} only"),
        }
        if sink.is_none() {
            tracing::warn!(
                "MESH_AUDIT_ADDR is not set: refused admin RPCs are logged and counted, not audited"
            );
        }
        Self {
            inner: Arc::new(Inner {
                admins,
                tls,
                source_service,
                denied,
                audits,
                sink,
                in_flight: Arc::new(Semaphore::new(MAX_AUDITS_IN_FLIGHT)),
                log: Throttle::new(Duration::from_secs(1)),
            }),
        }
    }

    /// `Ok` when the caller of `req` may call the admin RPC `method` (its
    /// full path, `/package.Service/Method`); else PERMISSION_DENIED, and
    /// the refusal is counted, logged and audited (module docs).
    pub fn check<T>(&self, req: &Request<T>, method: &'static str) -> Result<(), Status> {
        let me = &self.inner;
        let who = caller(req);
        let Err(refusal) = decide(&me.admins, me.tls, who) else {
            return Ok(());
        };
        let (service, name) = split_path(method);
        me.denied
            .get_or_create(&MethodLabels { grpc_service: service.to_owned(), grpc_method: name.to_owned() })
            .inc();
        let reason = match (refusal, who) {
            (Refusal::NotListed, Some(id)) => format!("caller {id} is not in {}", keys::ADMIN_IDENTITIES),
            _ if me.tls => "the caller's certificate names no spiffe:// identity".to_owned(),
            _ => "the caller has no identity: this server runs without TLS".to_owned(),
        };
        if let Some(suppressed) = me.log.ready() {
            tracing::warn!(grpc_method = method, caller = who.map(CallerIdentity::as_str), reason = %reason, suppressed, "admin rpc refused");
        }
        self.audit(req, method, who, &reason);
        Err(Status::permission_denied(format!("permission denied: {method} is an admin RPC and {reason}")))
    }

    /// Whom `req` speaks for, when a service records it (audit's
    /// `source.service`): under TLS the caller's identity, whatever the
    /// request claims (PERMISSION_DENIED when its certificate names no
    /// `spiffe://` identity); without TLS `None`: nothing is proven, the
    /// request's own claim stands.
    pub fn attested<T>(&self, req: &Request<T>) -> Result<Option<CallerIdentity>, Status> {
        if !self.inner.tls {
            return Ok(None);
        }
        match caller(req) {
            Some(id) => Ok(Some(id.clone())),
            None => Err(Status::permission_denied(
                "permission denied: the caller's certificate names no spiffe:// identity to record as the source",
            )),
        }
    }

    /// Hands the denial's audit event to the sink, in the background.
    fn audit<T>(&self, req: &Request<T>, method: &str, who: Option<&CallerIdentity>, reason: &str) {
        let me = &self.inner;
        let Some(sink) = me.sink.clone() else { return };
        let Ok(permit) = me.in_flight.clone().try_acquire_owned() else {
            me.audits.get_or_create(&ResultLabels { result: "dropped" }).inc();
            return;
        };
        let event = denial_event(req, method, who, reason, me.source_service);
        let audits = me.audits.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let result = match tokio::time::timeout(AUDIT_TIMEOUT, sink(event)).await {
                Ok(Ok(())) => "appended",
                Ok(Err(s)) => {
                    tracing::warn!(code = ?s.code(), error = %s.message(), "cannot audit a refused admin rpc");
                    "failed"
                }
                Err(_) => {
                    tracing::warn!("cannot audit a refused admin rpc: timed out");
                    "failed"
                }
            };
            audits.get_or_create(&ResultLabels { result }).inc();
        });
    }
}

/// The Append of a denial: `authz.denied`, outcome DENIED, actor the
/// caller's identity (type `service`) or `anonymous`, resource the RPC,
/// metadata `{reason}`, a fresh idempotency key (so retries stay one row).
fn denial_event<T>(
    req: &Request<T>,
    method: &str,
    who: Option<&CallerIdentity>,
    reason: &str,
    source_service: &str,
) -> AppendRequest {
    let actor = match who {
        Some(id) => Actor { r#type: "service".into(), id: id.to_string() },
        None => Actor { r#type: "anonymous".into(), id: "anonymous".into() },
    };
    let mut metadata = prost_types::Struct::default();
    metadata.fields.insert(
        "reason".into(),
        prost_types::Value { kind: Some(prost_types::value::Kind::StringValue(reason.to_owned())) },
    );
    AppendRequest {
        event: Some(AuditEvent {
            occurred_at: Some(prost_types::Timestamp::from(SystemTime::now())),
            actor: Some(actor),
            action: DENIED_ACTION.into(),
            resource: Some(Resource { r#type: "rpc".into(), id: method.to_owned() }),
            outcome: Outcome::Denied as i32,
            source: Some(Source {
                ip: req.remote_addr().map(|a| a.ip().to_string()).unwrap_or_default(),
                user_agent: req
                    .metadata()
                    .get("user-agent")
                    .and_then(|v| v.to_str().ok())
                    .map(|s| s.chars().take(256).collect())
                    .unwrap_or_default(),
                service: source_service.to_owned(),
            }),
            request_id: crate::grpc::request_id_of(req).map(|r| r.to_string()).unwrap_or_default(),
            trace_id: crate::trace_context::current_trace_id().unwrap_or_default(),
            metadata: Some(metadata),
            ..Default::default()
        }),
        idempotency_key: format!("{DENIED_ACTION}:{}", uuid::Uuid::new_v4()),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn admins(v: Option<&str>) -> AdminIdentities {
        let mut m: HashMap<&'static str, String> = HashMap::new();
        if let Some(v) = v {
            m.insert(keys::ADMIN_IDENTITIES, v.to_owned());
        }
        AdminIdentities::from_lookup(&m).unwrap()
    }

    const OPS: &str = "spiffe://mesh.local/ns/default/sa/ops";
    const DATA: &str = "spiffe://mesh.local/ns/default/sa/data";

    #[test]
    fn the_decision_table_holds() {
        let ops = CallerIdentity(OPS.into());
        let data = CallerIdentity(DATA.into());
        let unset = admins(None);
        let listed = admins(Some(&format!(" {OPS} ,")));
        let nobody = admins(Some(","));
        assert_eq!(listed.0.as_ref().unwrap().len(), 1);
        assert!(nobody.0.as_ref().unwrap().is_empty());
        // TLS on: only listed identities.
        assert_eq!(decide(&listed, true, Some(&ops)), Ok(()));
        assert_eq!(decide(&listed, true, Some(&data)), Err(Refusal::NotListed));
        assert_eq!(decide(&listed, true, None), Err(Refusal::NoIdentity));
        assert_eq!(decide(&nobody, true, Some(&ops)), Err(Refusal::NotListed));
        assert_eq!(decide(&unset, true, Some(&ops)), Err(Refusal::NotListed));
        assert_eq!(decide(&unset, true, None), Err(Refusal::NoIdentity));
        // TLS off: open only while unset.
        assert_eq!(decide(&unset, false, None), Ok(()));
        assert_eq!(decide(&listed, false, None), Err(Refusal::NoIdentity));
    }

    #[test]
    fn identities_must_be_spiffe_uris() {
        let mut m: HashMap<&'static str, String> = HashMap::new();
        m.insert(keys::ADMIN_IDENTITIES, format!("{OPS},ops"));
        let e = AdminIdentities::from_lookup(&m).unwrap_err();
        assert_eq!(e.key, keys::ADMIN_IDENTITIES);
        assert!(e.reason.contains("\"ops\""), "{e}");
        assert_eq!(admins(Some("  ")), AdminIdentities(None));
    }

    #[tokio::test]
    async fn a_refusal_is_permission_denied_counted_and_audited() {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let sink: AuditSink = Arc::new(move |req| {
            let tx = tx.clone();
            Box::pin(async move {
                tx.send(req).unwrap();
                Ok(())
            })
        });
        let mut registry = Registry::default();
        let method = "/mesh.ratelimit.v1.RateLimitService/Reset";
        let guard = AdminGuard::with_policy(
            admins(Some(OPS)),
            true,
            "mesh-test",
            &[method],
            Some(sink),
            &mut registry,
        );
        let mut req = Request::new(());
        req.extensions_mut().insert(CallerIdentity(DATA.into()));
        let s = guard.check(&req, method).unwrap_err();
        assert_eq!(s.code(), tonic::Code::PermissionDenied);
        assert!(s.message().contains(DATA) && s.message().contains(method), "{}", s.message());
        let e = rx.recv().await.unwrap();
        let ev = e.event.unwrap();
        assert_eq!((ev.action.as_str(), ev.outcome), (DENIED_ACTION, Outcome::Denied as i32));
        assert_eq!(ev.actor.unwrap().id, DATA);
        assert_eq!(ev.resource.unwrap().id, method);
        assert_eq!(ev.source.unwrap().service, "mesh-test");
        assert!(e.idempotency_key.starts_with("authz.denied:"));

        req.extensions_mut().insert(CallerIdentity(OPS.into()));
        guard.check(&req, method).unwrap();
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(
            text.contains(
                "mesh_authz_denied_total{grpc_service=\"mesh.ratelimit.v1.RateLimitService\",grpc_method=\"Reset\"} 1"
            ),
            "{text}"
        );
    }
}
