//! Requests parsed once, at the boundary, into the types the rest of the
//! service trusts. Bad input is INVALID_ARGUMENT with one violation per
//! field and nothing written; a bad *token* is never INVALID_ARGUMENT but
//! UNAUTHENTICATED (or `revoked: false`), like an unknown one.

use std::{collections::BTreeMap, net::IpAddr, time::Duration};

use mesh_proto::session as pb;
use tonic_types::FieldViolation;

use crate::{
    config::{MIN_TIMEOUT, SessionConfig},
    error::Error,
    token::{Bucket, SessionId, Token, TokenHash},
};

/// Longest user id (bytes).
pub(crate) const MAX_USER_ID: usize = 256;
/// Most attribute bytes (keys and values together).
pub(crate) const MAX_ATTRIBUTES: usize = 8 * 1024;
/// Longest user agent (bytes).
pub(crate) const MAX_USER_AGENT: usize = 1024;

/// A user id: non-empty, at most [`MAX_USER_ID`] bytes, no control characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct UserId(String);

impl UserId {
    pub(crate) fn as_str(&self) -> &str {
        &self.0
    }

    pub(crate) fn bucket(&self) -> Bucket {
        Bucket::of_user(&self.0)
    }
}

/// Where a call comes from (for rate limiting and audit).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Client {
    /// Canonical text form, or empty.
    pub(crate) ip: String,
    pub(crate) user_agent: String,
}

/// A validated CreateSession.
#[derive(Debug, Clone)]
pub(crate) struct NewSession {
    pub(crate) user_id: UserId,
    /// The attributes as a JSON object (how Redis keeps them).
    pub(crate) attributes_json: String,
    pub(crate) idle_timeout: Duration,
    pub(crate) absolute_timeout: Duration,
    pub(crate) client: Client,
}

/// What RevokeSession targets.
#[derive(Debug, Clone)]
pub(crate) enum RevokeTarget {
    Id(SessionId),
    /// A token; `None` when it cannot be one of ours (nothing to revoke).
    Token(Option<(Bucket, TokenHash)>),
}

/// A validated RevokeUserSessions.
#[derive(Debug, Clone)]
pub(crate) struct RevokeUser {
    pub(crate) user_id: UserId,
    pub(crate) except: Option<SessionId>,
    pub(crate) client: Client,
}

#[derive(Debug, Default)]
struct Violations(Vec<FieldViolation>);

impl Violations {
    fn add(&mut self, field: &str, description: impl Into<String>) {
        self.0.push(FieldViolation::new(field, description));
    }

    fn finish<T>(self, value: T) -> Result<T, Error> {
        if self.0.is_empty() { Ok(value) } else { Err(Error::InvalidArgument(self.0)) }
    }

    fn user_id(&mut self, field: &str, v: String) -> UserId {
        // Blank ids are refused like empty ones: the audit log (which records
        // every session's changes, and every data write, with the user id as
        // the actor) requires an actor id that is not blank.
        if v.trim().is_empty() {
            self.add(field, "must not be empty or blank");
        } else if v.len() > MAX_USER_ID {
            self.add(field, format!("must be at most {MAX_USER_ID} bytes"));
        } else if v.chars().any(char::is_control) {
            self.add(field, "must not contain control characters");
        }
        UserId(v)
    }

    fn client(&mut self, field: &str, c: Option<pb::ClientInfo>) -> Client {
        let c = c.unwrap_or_default();
        let ip = match c.ip.trim() {
            "" => String::new(),
            ip => match ip.parse::<IpAddr>() {
                // Canonical form, so one address is one rate-limit counter.
                Ok(ip) => ip.to_canonical().to_string(),
                Err(_) => {
                    self.add(&format!("{field}.ip"), "must be an IPv4 or IPv6 address");
                    String::new()
                }
            },
        };
        if c.user_agent.len() > MAX_USER_AGENT {
            self.add(&format!("{field}.user_agent"), format!("must be at most {MAX_USER_AGENT} bytes"));
        } else if c.user_agent.contains('\0') {
            self.add(&format!("{field}.user_agent"), "must not contain NUL characters");
        }
        Client { ip, user_agent: c.user_agent }
    }

    fn timeout(
        &mut self,
        field: &str,
        v: Option<prost_types::Duration>,
        default: Duration,
        max: Duration,
    ) -> Duration {
        let Some(d) = v else { return default };
        match Duration::try_from(d) {
            Err(_) => {
                self.add(field, "must be a positive duration");
                default
            }
            Ok(d) if d < MIN_TIMEOUT => {
                self.add(field, format!("must be at least {}s", MIN_TIMEOUT.as_secs()));
                default
            }
            Ok(d) if d > max => {
                self.add(field, format!("must be at most {}s (the configured maximum)", max.as_secs()));
                default
            }
            // Redis keeps milliseconds.
            Ok(d) => Duration::from_millis(d.as_millis() as u64),
        }
    }

    fn session_id(&mut self, field: &str, v: &str) -> Option<SessionId> {
        let id = SessionId::parse(v);
        if id.is_none() {
            self.add(field, "is not a session id");
        }
        id
    }
}

/// Parses CreateSession.
pub(crate) fn create(r: pb::CreateSessionRequest, c: &SessionConfig) -> Result<NewSession, Error> {
    let mut v = Violations::default();
    let user_id = v.user_id("user_id", r.user_id);
    let mut size = 0;
    for key in r.attributes.keys() {
        if key.is_empty() {
            v.add("attributes", "keys must not be empty");
            break;
        }
    }
    for (key, value) in &r.attributes {
        size += key.len() + value.len();
    }
    if size > MAX_ATTRIBUTES {
        v.add(
            "attributes",
            format!("must be at most {MAX_ATTRIBUTES} bytes in all (keys and values), got {size}"),
        );
    }
    let idle_timeout = v.timeout("idle_timeout", r.idle_timeout, c.idle_timeout, c.max_idle_timeout);
    let absolute_timeout =
        v.timeout("absolute_timeout", r.absolute_timeout, c.absolute_timeout, c.max_absolute_timeout);
    let client = v.client("client", r.client);
    // Sorted, so equal attributes are equal bytes in Redis.
    let attributes: BTreeMap<String, String> = r.attributes.into_iter().collect();
    let attributes_json = serde_json::to_string(&attributes).expect("a string map always serialises");
    v.finish(NewSession { user_id, attributes_json, idle_timeout, absolute_timeout, client })
}

/// Parses a token that must be valid: anything else is UNAUTHENTICATED.
pub(crate) fn token(t: &str) -> Result<(Bucket, TokenHash), Error> {
    Token::parse(t).ok_or(Error::Unauthenticated)
}

/// Parses RefreshSession.
pub(crate) fn refresh(r: pb::RefreshSessionRequest) -> Result<((Bucket, TokenHash), Client), Error> {
    let mut v = Violations::default();
    let client = v.client("client", r.client);
    v.finish(())?;
    Ok((token(&r.token)?, client))
}

/// Parses RevokeSession.
pub(crate) fn revoke(r: pb::RevokeSessionRequest) -> Result<(RevokeTarget, Client), Error> {
    use pb::revoke_session_request::Target;
    let mut v = Violations::default();
    let client = v.client("client", r.client);
    let target = match r.target {
        None => {
            v.add("target", "session_id or token is required");
            None
        }
        Some(Target::SessionId(id)) => v.session_id("session_id", &id).map(RevokeTarget::Id),
        Some(Target::Token(t)) => Some(RevokeTarget::Token(Token::parse(&t))),
    };
    v.finish(())?;
    Ok((target.expect("no violations means a target"), client))
}

/// Parses RevokeUserSessions.
pub(crate) fn revoke_user(r: pb::RevokeUserSessionsRequest) -> Result<RevokeUser, Error> {
    let mut v = Violations::default();
    let user_id = v.user_id("user_id", r.user_id);
    let except = r.except_session_id.as_deref().and_then(|id| v.session_id("except_session_id", id));
    let client = v.client("client", r.client);
    v.finish(RevokeUser { user_id, except, client })
}

/// Parses ListUserSessions.
pub(crate) fn list(r: pb::ListUserSessionsRequest) -> Result<UserId, Error> {
    let mut v = Violations::default();
    let user_id = v.user_id("user_id", r.user_id);
    v.finish(user_id)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(e: Error) -> Vec<String> {
        match e {
            Error::InvalidArgument(v) => v.into_iter().map(|f| f.field).collect(),
            other => panic!("{other:?}"),
        }
    }

    fn secs(s: i64) -> Option<prost_types::Duration> {
        Some(prost_types::Duration { seconds: s, nanos: 0 })
    }

    #[test]
    fn a_good_create_gets_defaults_and_canonical_values() {
        let c = SessionConfig::default();
        let n = create(
            pb::CreateSessionRequest {
                user_id: "alice".into(),
                attributes: [("b".to_owned(), "2".to_owned()), ("a".to_owned(), "1".to_owned())].into(),
                idle_timeout: secs(60),
                absolute_timeout: None,
                client: Some(pb::ClientInfo { ip: " ::ffff:10.0.0.1 ".into(), user_agent: "ua/1".into() }),
            },
            &c,
        )
        .unwrap();
        assert_eq!(n.attributes_json, r#"{"a":"1","b":"2"}"#);
        assert_eq!((n.idle_timeout, n.absolute_timeout), (Duration::from_secs(60), c.absolute_timeout));
        assert_eq!(n.client.ip, "10.0.0.1");
    }

    #[test]
    fn bad_creates_name_every_field() {
        let c = SessionConfig::default();
        let e = create(
            pb::CreateSessionRequest {
                user_id: String::new(),
                attributes: [("k".to_owned(), "x".repeat(MAX_ATTRIBUTES))].into(),
                idle_timeout: Some(prost_types::Duration { seconds: -1, nanos: 0 }),
                absolute_timeout: secs(365 * 24 * 3600),
                client: Some(pb::ClientInfo { ip: "not-an-ip".into(), user_agent: "u".repeat(2000) }),
            },
            &c,
        )
        .unwrap_err();
        assert_eq!(
            fields(e),
            ["user_id", "attributes", "idle_timeout", "absolute_timeout", "client.ip", "client.user_agent"]
        );
        let e = create(
            pb::CreateSessionRequest { user_id: "a\nb".into(), idle_timeout: secs(0), ..Default::default() },
            &c,
        )
        .unwrap_err();
        assert_eq!(fields(e), ["user_id", "idle_timeout"]);
        let e = create(pb::CreateSessionRequest { user_id: "x".repeat(257), ..Default::default() }, &c)
            .unwrap_err();
        assert_eq!(fields(e), ["user_id"]);
        for blank in [" ", "\u{3000}", " \u{a0} "] {
            let e = create(pb::CreateSessionRequest { user_id: blank.into(), ..Default::default() }, &c)
                .unwrap_err();
            assert_eq!(fields(e), ["user_id"], "{blank:?}");
        }
    }

    #[test]
    fn bad_tokens_are_unauthenticated_not_invalid() {
        assert!(matches!(token("nope"), Err(Error::Unauthenticated)));
        let (target, _) = revoke(pb::RevokeSessionRequest {
            target: Some(pb::revoke_session_request::Target::Token("nope".into())),
            client: None,
        })
        .unwrap();
        assert!(matches!(target, RevokeTarget::Token(None)));
        let e = revoke(pb::RevokeSessionRequest { target: None, client: None }).unwrap_err();
        assert_eq!(fields(e), ["target"]);
        let e = revoke(pb::RevokeSessionRequest {
            target: Some(pb::revoke_session_request::Target::SessionId("nope".into())),
            client: None,
        })
        .unwrap_err();
        assert_eq!(fields(e), ["session_id"]);
    }

    #[test]
    fn revoke_user_checks_the_kept_session() {
        let e = revoke_user(pb::RevokeUserSessionsRequest {
            user_id: "u".into(),
            except_session_id: Some("bad".into()),
            client: None,
        })
        .unwrap_err();
        assert_eq!(fields(e), ["except_session_id"]);
        assert_eq!(
            fields(list(pb::ListUserSessionsRequest { user_id: String::new() }).unwrap_err()),
            ["user_id"]
        );
    }
}
