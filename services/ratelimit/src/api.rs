//! The gRPC APIs: `mesh.ratelimit.v1.RateLimitService` and Envoy's
//! `envoy.service.ratelimit.v3.RateLimitService`, both on one [`Engine`].

use std::{sync::Arc, time::Duration};

use mesh_proto::{
    envoy_rls::{self, RateLimitRequest, RateLimitResponse, rate_limit_response},
    ratelimit::{
        self as pb, CheckRequest, CheckResponse, GetRulesRequest, GetRulesResponse, ResetRequest,
        ResetResponse, rate_limit_service_server::RateLimitService,
    },
};
use mesh_runtime::AdminGuard;
use tonic::{Request, Response, Status, metadata::MetadataValue};

use crate::{
    engine::{Decision, Engine},
    request::{self, CheckCall},
    rules::{Algorithm, FailureMode, Level, RateLimitHeaders, Unit},
};

/// Response metadata naming what decided a Check: `redis`, `local-cache`,
/// `fail-open`, `fail-closed` or `rules` (no limit applied).
pub const DECIDED_BY: &str = "x-mesh-ratelimit-decided-by";

/// `Reset`, an admin RPC: only for `MESH_ADMIN_IDENTITIES` ([`mesh_runtime::authz`]).
pub(crate) const RESET: &str = "/mesh.ratelimit.v1.RateLimitService/Reset";

/// The gRPC APIs.
#[derive(Debug, Clone)]
pub(crate) struct Api {
    engine: Arc<Engine>,
    /// RateLimit headers of domains whose rules do not say.
    rate_limit_headers: RateLimitHeaders,
    /// Who may Reset.
    admin: AdminGuard,
}

impl Api {
    pub(crate) fn new(engine: Arc<Engine>, rate_limit_headers: RateLimitHeaders, admin: AdminGuard) -> Self {
        Self { engine, rate_limit_headers, admin }
    }
}

/// Seconds in a rate-limit unit, as Envoy's RateLimit headers count them
/// (a month is 30 days, a year 365).
fn unit_seconds(u: rate_limit_response::rate_limit::Unit) -> u64 {
    use rate_limit_response::rate_limit::Unit as U;
    match u {
        U::Unknown | U::Second => 1,
        U::Minute => 60,
        U::Hour => 3600,
        U::Day => 86_400,
        U::Week => 604_800,
        U::Month => 2_592_000,
        U::Year => 31_536_000,
    }
}

/// RateLimit headers for the client (draft-polli-ratelimit-headers-03, as
/// Envoy's `enable_x_ratelimit_headers: DRAFT_VERSION_03` and limitador
/// write them), from the statuses of one answer: the closest limit (the
/// fewest remaining) leads `x-ratelimit-limit`, followed by every limit's
/// quota policy (`<n>;w=<seconds>`, `;name="<name>"` when named);
/// `x-ratelimit-remaining` and `x-ratelimit-reset` (whole seconds, rounded
/// up) are the closest limit's. No headers when no descriptor had a limit.
fn rate_limit_headers(
    statuses: &[rate_limit_response::DescriptorStatus],
) -> Vec<mesh_proto::envoy::config::core::v3::HeaderValue> {
    use mesh_proto::envoy::config::core::v3::HeaderValue;
    let limited: Vec<_> = statuses.iter().filter_map(|s| Some((s, s.current_limit.as_ref()?))).collect();
    let Some((closest, closest_limit)) = limited.iter().min_by_key(|(s, _)| s.limit_remaining) else {
        return Vec::new();
    };
    let mut limit = closest_limit.requests_per_unit.to_string();
    for (_, l) in &limited {
        limit.push_str(&format!(", {};w={}", l.requests_per_unit, unit_seconds(l.unit())));
        if !l.name.is_empty() {
            limit.push_str(&format!(";name=\"{}\"", l.name));
        }
    }
    let header = |key: &str, value: String| HeaderValue { key: key.to_owned(), value, raw_value: Vec::new() };
    let mut out = vec![
        header("x-ratelimit-limit", limit),
        header("x-ratelimit-remaining", closest.limit_remaining.to_string()),
    ];
    if let Some(reset) = &closest.duration_until_reset {
        let secs = reset.seconds.max(0) as u64 + u64::from(reset.nanos > 0);
        out.push(header("x-ratelimit-reset", secs.to_string()));
    }
    out
}

fn duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration { seconds: d.as_secs() as i64, nanos: d.subsec_nanos() as i32 }
}

fn respond<T>(body: T, decision: &Decision) -> Response<T> {
    let mut r = Response::new(body);
    r.metadata_mut().insert(DECIDED_BY, MetadataValue::from_static(decision.decided_by.as_str()));
    r
}

fn unit(u: Unit) -> pb::Unit {
    match u {
        Unit::Second => pb::Unit::Second,
        Unit::Minute => pb::Unit::Minute,
        Unit::Hour => pb::Unit::Hour,
        Unit::Day => pb::Unit::Day,
        Unit::Week => pb::Unit::Week,
        Unit::Month => pb::Unit::Month,
        Unit::Year => pb::Unit::Year,
    }
}

fn algorithm(a: Algorithm) -> pb::Algorithm {
    match a {
        Algorithm::FixedWindow => pb::Algorithm::FixedWindow,
        Algorithm::SlidingWindow => pb::Algorithm::SlidingWindow,
        Algorithm::TokenBucket => pb::Algorithm::TokenBucket,
    }
}

fn rule_nodes(level: &Level) -> Vec<pb::RuleDescriptor> {
    level
        .nodes
        .iter()
        .map(|n| {
            let rule = n.rule.as_deref();
            pb::RuleDescriptor {
                key: n.key.clone(),
                value: n.value.clone().unwrap_or_default(),
                rate_limit: rule.and_then(|r| {
                    let l = r.limit.as_ref()?;
                    Some(pb::RateLimit {
                        name: r.name.to_string(),
                        requests_per_unit: l.requests_per_unit,
                        unit: unit(l.unit).into(),
                        algorithm: algorithm(l.algorithm).into(),
                        burst: l.burst,
                    })
                }),
                unlimited: rule.is_some_and(|r| r.limit.is_none()),
                shadow_mode: rule.is_some_and(|r| r.shadow_mode),
                replaces: rule.map(|r| r.replaces.clone()).unwrap_or_default(),
                descriptors: rule_nodes(&n.children),
            }
        })
        .collect()
}

#[tonic::async_trait]
impl RateLimitService for Api {
    async fn check(&self, req: Request<CheckRequest>) -> Result<Response<CheckResponse>, Status> {
        let call = CheckCall::from_mesh(req.into_inner())?;
        let decision = self.engine.check(&call).await;
        let code = |over: bool| if over { pb::Code::OverLimit } else { pb::Code::Ok };
        let statuses = decision
            .statuses
            .iter()
            .map(|s| pb::DescriptorStatus {
                code: code(s.over).into(),
                current_limit: s.limit().map(|(r, l)| pb::RateLimit {
                    name: r.name.to_string(),
                    requests_per_unit: l.requests_per_unit,
                    unit: unit(l.unit).into(),
                    algorithm: algorithm(l.algorithm).into(),
                    burst: l.burst,
                }),
                limit_remaining: s.remaining,
                duration_until_reset: s.reset.map(duration),
                retry_after: s.retry_after.map(duration),
                shadow_mode: s.shadow,
            })
            .collect();
        let body = CheckResponse { overall_code: code(decision.over).into(), statuses };
        Ok(respond(body, &decision))
    }

    async fn reset(&self, req: Request<ResetRequest>) -> Result<Response<ResetResponse>, Status> {
        self.admin.check(&req, RESET)?;
        let (domain, entries) = request::reset(req.into_inner())?;
        self.engine.reset(&domain, &entries).await?;
        Ok(Response::new(ResetResponse {}))
    }

    async fn get_rules(&self, req: Request<GetRulesRequest>) -> Result<Response<GetRulesResponse>, Status> {
        let req = req.into_inner();
        request::get_rules(&req)?;
        let rules = self.engine.rules();
        let domain = rules
            .domain(&req.domain)
            .ok_or_else(|| crate::error::Error::NotFound(format!("no rules for domain {:?}", req.domain)))?;
        Ok(Response::new(GetRulesResponse {
            domain: domain.name.clone(),
            failure_mode: match domain.failure_mode {
                FailureMode::FailOpen => pb::FailureMode::FailOpen,
                FailureMode::FailClosed => pb::FailureMode::FailClosed,
            }
            .into(),
            descriptors: rule_nodes(&domain.root),
            source: domain.source.clone(),
            loaded_at: Some(prost_types::Timestamp::from(rules.loaded_at)),
        }))
    }
}

/// Envoy's RLS on the same engine.
#[tonic::async_trait]
impl envoy_rls::rate_limit_service_server::RateLimitService for Api {
    async fn should_rate_limit(
        &self,
        req: Request<RateLimitRequest>,
    ) -> Result<Response<RateLimitResponse>, Status> {
        use rate_limit_response::{Code, DescriptorStatus, RateLimit, rate_limit::Unit as EUnit};
        let call = CheckCall::from_envoy(req.into_inner())?;
        let decision = self.engine.check(&call).await;
        let headers = self
            .engine
            .rules()
            .domain(&call.domain)
            .and_then(|d| d.rate_limit_headers)
            .unwrap_or(self.rate_limit_headers)
            == RateLimitHeaders::DraftVersion03;
        let code = |over: bool| if over { Code::OverLimit } else { Code::Ok };
        let statuses: Vec<DescriptorStatus> = decision
            .statuses
            .iter()
            .map(|s| DescriptorStatus {
                code: code(s.over).into(),
                current_limit: s.limit().map(|(r, l)| RateLimit {
                    // Envoy reports only names given in the rules file.
                    name: if r.named { r.name.to_string() } else { String::new() },
                    requests_per_unit: l.requests_per_unit,
                    unit: match l.unit {
                        Unit::Second => EUnit::Second,
                        Unit::Minute => EUnit::Minute,
                        Unit::Hour => EUnit::Hour,
                        Unit::Day => EUnit::Day,
                        Unit::Week => EUnit::Week,
                        Unit::Month => EUnit::Month,
                        Unit::Year => EUnit::Year,
                    }
                    .into(),
                }),
                limit_remaining: s.remaining,
                duration_until_reset: s.reset.map(duration),
                quota: None,
            })
            .collect();
        let body = RateLimitResponse {
            overall_code: code(decision.over).into(),
            response_headers_to_add: if headers { rate_limit_headers(&statuses) } else { Vec::new() },
            statuses,
            ..RateLimitResponse::default()
        };
        Ok(respond(body, &decision))
    }
}
