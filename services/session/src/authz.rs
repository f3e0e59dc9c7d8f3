//! Envoy's external authorization API (`envoy.service.auth.v3.Authorization/Check`,
//! the `ext_authz` HTTP filter over gRPC), served on the session service's
//! port, so Envoy (or a gateway built on it) checks sessions at the edge.
//!
//! The token is the `Authorization: Bearer <token>` header of the HTTP
//! request Envoy describes (`attributes.request.http`, `headers` or
//! `header_map`), else the configured cookie. It goes through the one
//! validation path ValidateSession uses ([`Api::validate_token`]): the same
//! cache, invalidated by the same revocations, the same metrics and traces,
//! so a revoked session is refused at the edge on its next request.
//!
//! - Valid: `status` OK and an `ok_response` that sets the user id and session
//!   id headers for the upstream with `OVERWRITE_IF_EXISTS_OR_ADD`, which
//!   discards any copy the client sent, so a client cannot forge them.
//! - Missing, malformed, unknown, expired or revoked: `status`
//!   UNAUTHENTICATED and a `denied_response` of HTTP 401 with
//!   `WWW-Authenticate: Bearer realm="mesh"` (RFC 6750; `error="invalid_token"`
//!   when a token was presented) and the reason header (`missing_token`,
//!   `invalid_token`).
//! - Redis cannot answer: the gRPC call fails UNAVAILABLE, so the filter's own
//!   `failure_mode_allow` / `status_on_error` decide (as for RLS).
//!
//! Touching (sliding the idle expiry) follows `MESH_SESSION_EXT_AUTHZ_TOUCH`,
//! and a route may override it with the `ext_authz` per-route
//! `check_settings.context_extensions` entry `touch: "true" | "false"`.

use mesh_proto::envoy::{
    config::core::v3::{HeaderValue, HeaderValueOption, header_value_option::HeaderAppendAction},
    r#type::v3::{HttpStatus, StatusCode},
};
use mesh_proto::envoy_authz::{
    AttributeContext, CheckRequest, CheckResponse, DeniedHttpResponse, OkHttpResponse,
    authorization_server::Authorization, check_response::HttpResponse,
};
use tonic::{Request, Response, Status};

use crate::{api::Api, error::Error};

/// How the ext_authz answers are shaped (`MESH_SESSION_EXT_AUTHZ_*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthzConfig {
    /// Header carrying the user id to the upstream (lowercase).
    pub user_header: String,
    /// Header carrying the session id to the upstream (lowercase).
    pub session_header: String,
    /// Header carrying why a request was denied, to the client.
    pub reason_header: String,
    /// Cookie holding the token when there is no bearer token; `None`: none.
    pub cookie: Option<String>,
    /// Whether a check slides the session's idle expiry (per-route override:
    /// the context extension `touch`).
    pub touch: bool,
}

impl Default for AuthzConfig {
    fn default() -> Self {
        Self {
            user_header: "x-mesh-user-id".to_owned(),
            session_header: "x-mesh-session-id".to_owned(),
            reason_header: "x-mesh-auth-reason".to_owned(),
            cookie: None,
            touch: true,
        }
    }
}

/// The `envoy.service.auth.v3.Authorization` service.
#[derive(Debug, Clone)]
pub(crate) struct Authz {
    api: Api,
    config: AuthzConfig,
}

impl Authz {
    pub(crate) fn new(api: Api, config: AuthzConfig) -> Self {
        Self { api, config }
    }
}

/// Why a request is denied: the reason header's value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Denial {
    MissingToken,
    InvalidToken,
}

impl Denial {
    fn reason(self) -> &'static str {
        match self {
            Self::MissingToken => "missing_token",
            Self::InvalidToken => "invalid_token",
        }
    }

    /// `WWW-Authenticate` per RFC 6750 section 3: no error code when the
    /// request carried no credentials.
    fn challenge(self) -> &'static str {
        match self {
            Self::MissingToken => r#"Bearer realm="mesh""#,
            Self::InvalidToken => r#"Bearer realm="mesh", error="invalid_token""#,
        }
    }
}

/// One header of the HTTP request Envoy describes, by lowercase name. Envoy
/// sends `headers` (a map, names lowercased, repeated headers joined) or,
/// with `encode_raw_headers`, `header_map` (values possibly as raw bytes).
fn header<'a>(attrs: &'a AttributeContext, name: &str) -> Option<std::borrow::Cow<'a, str>> {
    let http = attrs.request.as_ref()?.http.as_ref()?;
    if let Some(v) = http.headers.get(name) {
        return Some(v.into());
    }
    let h = http.header_map.as_ref()?.headers.iter().find(|h| h.key.eq_ignore_ascii_case(name))?;
    if h.raw_value.is_empty() {
        Some(h.value.as_str().into())
    } else {
        Some(String::from_utf8_lossy(&h.raw_value))
    }
}

/// The bearer token of an `Authorization` value (scheme case-insensitive,
/// RFC 6750 section 2.1).
fn bearer(v: &str) -> Option<&str> {
    let (scheme, rest) = v.trim().split_once(' ')?;
    let token = rest.trim_start();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// The value of cookie `name` in a `Cookie` header (RFC 6265 section 5.4).
fn cookie<'a>(v: &'a str, name: &str) -> Option<&'a str> {
    v.split(';')
        .filter_map(|c| c.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.trim_matches('"'))
}

fn overwrite(key: &str, value: &str) -> HeaderValueOption {
    HeaderValueOption {
        header: Some(HeaderValue { key: key.to_owned(), value: value.to_owned(), raw_value: Vec::new() }),
        append_action: HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
        ..HeaderValueOption::default()
    }
}

fn rpc_status(code: tonic::Code, message: &str) -> Option<tonic_types::pb::Status> {
    Some(tonic_types::pb::Status { code: code as i32, message: message.to_owned(), details: Vec::new() })
}

impl Authz {
    fn token(&self, attrs: &AttributeContext) -> Option<String> {
        if let Some(a) = header(attrs, "authorization")
            && let Some(t) = bearer(&a)
        {
            return Some(t.to_owned());
        }
        let name = self.config.cookie.as_deref()?;
        let c = header(attrs, "cookie")?;
        cookie(&c, name).map(str::to_owned)
    }

    fn touch(&self, attrs: &AttributeContext) -> bool {
        match attrs.context_extensions.get("touch").map(String::as_str) {
            Some("true") => true,
            Some("false") => false,
            _ => self.config.touch,
        }
    }

    fn deny(&self, d: Denial) -> CheckResponse {
        CheckResponse {
            status: rpc_status(tonic::Code::Unauthenticated, d.reason()),
            http_response: Some(HttpResponse::DeniedResponse(DeniedHttpResponse {
                status: Some(HttpStatus { code: StatusCode::Unauthorized as i32 }),
                headers: vec![
                    overwrite("www-authenticate", d.challenge()),
                    overwrite(&self.config.reason_header, d.reason()),
                ],
                body: String::new(),
            })),
            dynamic_metadata: None,
        }
    }
}

#[tonic::async_trait]
impl Authorization for Authz {
    async fn check(&self, req: Request<CheckRequest>) -> Result<Response<CheckResponse>, Status> {
        let attrs = req.into_inner().attributes.unwrap_or_default();
        let Some(token) = self.token(&attrs) else {
            return Ok(Response::new(self.deny(Denial::MissingToken)));
        };
        let session = match self.api.validate_token(&token, self.touch(&attrs)).await {
            Ok(s) => s,
            Err(Error::Unauthenticated) => return Ok(Response::new(self.deny(Denial::InvalidToken))),
            Err(e) => return Err(e.into()),
        };
        Ok(Response::new(CheckResponse {
            status: rpc_status(tonic::Code::Ok, ""),
            http_response: Some(HttpResponse::OkResponse(OkHttpResponse {
                headers: vec![
                    overwrite(&self.config.user_header, &session.user_id),
                    overwrite(&self.config.session_header, &session.id),
                ],
                ..OkHttpResponse::default()
            })),
            dynamic_metadata: None,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_tokens_and_cookies_parse_as_the_rfcs_say() {
        assert_eq!(bearer("Bearer abc"), Some("abc"));
        assert_eq!(bearer("bearer   abc "), Some("abc"));
        assert_eq!(bearer("Basic abc"), None);
        assert_eq!(bearer("Bearer "), None);
        assert_eq!(bearer("Bearer"), None);
        assert_eq!(cookie("a=1; mesh_session=tok; b=2", "mesh_session"), Some("tok"));
        assert_eq!(cookie("a=1;mesh_session=\"tok\"", "mesh_session"), Some("tok"));
        assert_eq!(cookie("xmesh_session=tok", "mesh_session"), None);
    }
}
