//! Envoy's external authorization API (`envoy.service.auth.v3.Authorization/Check`)
//! called as Envoy's `ext_authz` filter calls it: a CheckRequest describing
//! the HTTP request in `attributes.request.http` (`headers`, lowercased, or
//! `header_map`), per-route `context_extensions`.

use std::{collections::HashMap, time::Duration};

use mesh_proto::{
    envoy::config::core::v3::{
        HeaderMap, HeaderValue, HeaderValueOption, header_value_option::HeaderAppendAction,
    },
    envoy_authz::{
        AttributeContext, CheckRequest, CheckResponse,
        attribute_context::{HttpRequest, Request as AttrRequest},
        authorization_client::AuthorizationClient,
        check_response::HttpResponse,
    },
    session::{RevokeSessionRequest, ValidateSessionRequest, revoke_session_request::Target},
};
use mesh_session::token::{Bucket, Token};
use mesh_testkit::{Infra, redis_prefix};
use tonic::transport::Channel;

use crate::helpers::{Fixture, config_with_prefix, create, create_req, eventually, ms};

/// A CheckRequest as Envoy sends it for `GET /orders` with `headers`.
fn check_req(headers: &[(&str, &str)], extensions: &[(&str, &str)]) -> CheckRequest {
    let mut h: HashMap<String, String> =
        [(":method", "GET"), (":path", "/orders"), (":authority", "shop.example")]
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
    h.extend(headers.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
    CheckRequest {
        attributes: Some(AttributeContext {
            request: Some(AttrRequest {
                time: None,
                http: Some(HttpRequest {
                    id: "7f3a".into(),
                    method: "GET".into(),
                    headers: h,
                    path: "/orders".into(),
                    host: "shop.example".into(),
                    scheme: "https".into(),
                    protocol: "HTTP/1.1".into(),
                    ..HttpRequest::default()
                }),
            }),
            context_extensions: extensions.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(),
            ..AttributeContext::default()
        }),
    }
}

async fn check(c: &mut AuthorizationClient<Channel>, req: CheckRequest) -> CheckResponse {
    c.check(req).await.expect("Check answers").into_inner()
}

/// The headers of a response, by name: (value, append action).
fn headers(opts: &[HeaderValueOption]) -> HashMap<String, (String, i32)> {
    opts.iter()
        .map(|o| {
            let h = o.header.as_ref().expect("a header");
            (h.key.clone(), (h.value.clone(), o.append_action))
        })
        .collect()
}

const OVERWRITE: i32 = HeaderAppendAction::OverwriteIfExistsOrAdd as i32;

/// Asserts an allow that hands the upstream `user` and `session` in headers
/// that replace whatever the client sent.
fn assert_allowed(r: &CheckResponse, user: &str, session: &str) {
    assert_eq!(r.status.as_ref().map(|s| s.code), Some(0), "{r:?}");
    let Some(HttpResponse::OkResponse(ok)) = &r.http_response else { panic!("not an ok_response: {r:?}") };
    let h = headers(&ok.headers);
    assert_eq!(h.get("x-mesh-user-id"), Some(&(user.to_owned(), OVERWRITE)), "{h:?}");
    assert_eq!(h.get("x-mesh-session-id"), Some(&(session.to_owned(), OVERWRITE)), "{h:?}");
    assert!(ok.headers_to_remove.is_empty(), "identity headers set, never removed after: {ok:?}");
}

/// Asserts a 401 denial with its challenge and reason.
fn assert_denied(r: &CheckResponse, reason: &str) {
    assert_eq!(r.status.as_ref().map(|s| s.code), Some(tonic::Code::Unauthenticated as i32), "{r:?}");
    let Some(HttpResponse::DeniedResponse(d)) = &r.http_response else {
        panic!("not a denied_response: {r:?}")
    };
    assert_eq!(d.status.as_ref().map(|s| s.code), Some(401));
    let h = headers(&d.headers);
    let challenge = &h.get("www-authenticate").expect("WWW-Authenticate").0;
    assert!(challenge.starts_with(r#"Bearer realm="mesh""#), "{challenge}");
    assert_eq!(challenge.contains(r#"error="invalid_token""#), reason == "invalid_token", "{challenge}");
    assert_eq!(h.get("x-mesh-auth-reason").map(|v| v.0.as_str()), Some(reason));
}

#[tokio::test]
async fn a_valid_token_is_allowed_and_forged_identity_headers_are_overwritten() {
    let infra = Infra::shared();
    let prefix = redis_prefix();
    let mut f = Fixture::new(config_with_prefix(infra, &prefix)).await;
    let created = create(&mut f.c, "authz-alice").await;
    let id = created.session.unwrap().id;
    let mut a = AuthorizationClient::new(mesh_testkit::channel(f.app.addr).await);
    let bearer = format!("Bearer {}", created.token);
    for scheme in [bearer.clone(), bearer.replacen("Bearer", "bearer", 1)] {
        let r = check(
            &mut a,
            check_req(
                &[
                    ("authorization", &scheme),
                    ("x-mesh-user-id", "mallory"),
                    ("x-mesh-session-id", "ses_forged"),
                ],
                &[],
            ),
        )
        .await;
        assert_allowed(&r, "authz-alice", &id);
    }
    // `header_map` (Envoy's encode_raw_headers), values as raw bytes.
    let mut req = check_req(&[], &[]);
    let http = req.attributes.as_mut().unwrap().request.as_mut().unwrap().http.as_mut().unwrap();
    http.headers.clear();
    http.header_map = Some(HeaderMap {
        headers: vec![HeaderValue {
            key: "Authorization".into(),
            value: String::new(),
            raw_value: bearer.clone().into_bytes(),
        }],
    });
    assert_allowed(&check(&mut a, req).await, "authz-alice", &id);
    // Without the cookie configured, a cookie is no credential.
    let cookie = format!("theme=dark; mesh_session={}", created.token);
    assert_denied(&check(&mut a, check_req(&[("cookie", &cookie)], &[])).await, "missing_token");

    // An instance reading the token from a cookie, with its own header names.
    let mut config = config_with_prefix(infra, &prefix);
    config.session.ext_authz.cookie = Some("mesh_session".into());
    config.session.ext_authz.user_header = "x-user".into();
    let other = Fixture::new(config).await;
    let mut a = AuthorizationClient::new(mesh_testkit::channel(other.app.addr).await);
    let r = check(&mut a, check_req(&[("cookie", &cookie), ("x-user", "mallory")], &[])).await;
    let Some(HttpResponse::OkResponse(ok)) = &r.http_response else { panic!("not allowed: {r:?}") };
    assert_eq!(headers(&ok.headers).get("x-user"), Some(&("authz-alice".to_owned(), OVERWRITE)));
    // A bearer token still comes first.
    let r = check(&mut a, check_req(&[("cookie", &cookie), ("authorization", "Bearer nonsense")], &[])).await;
    assert_eq!(r.status.as_ref().map(|s| s.code), Some(tonic::Code::Unauthenticated as i32));
}

#[tokio::test]
async fn missing_malformed_unknown_and_revoked_tokens_are_denied_with_401() {
    let infra = Infra::shared();
    let prefix = redis_prefix();
    let mut f = Fixture::new(config_with_prefix(infra, &prefix)).await;
    // A second instance sharing the sessions: the revocation is made there.
    let mut other = Fixture::new(config_with_prefix(infra, &prefix)).await;
    let mut a = AuthorizationClient::new(mesh_testkit::channel(f.app.addr).await);

    assert_denied(&check(&mut a, check_req(&[], &[])).await, "missing_token");
    assert_denied(&check(&mut a, check_req(&[("authorization", "Basic YTpi")], &[])).await, "missing_token");
    assert_denied(
        &check(&mut a, check_req(&[("authorization", "Bearer nonsense")], &[])).await,
        "invalid_token",
    );
    let unknown = Token::generate(Bucket::new(7).unwrap());
    let h = format!("Bearer {}", unknown.expose());
    assert_denied(&check(&mut a, check_req(&[("authorization", &h)], &[])).await, "invalid_token");

    let created = create(&mut f.c, "authz-bob").await;
    let id = created.session.unwrap().id;
    let h = format!("Bearer {}", created.token);
    // Allowed, so this instance has it in its validation cache.
    for _ in 0..3 {
        assert_allowed(&check(&mut a, check_req(&[("authorization", &h)], &[])).await, "authz-bob", &id);
    }
    other
        .c
        .revoke_session(RevokeSessionRequest { target: Some(Target::SessionId(id)), client: None })
        .await
        .expect("revoke answers");
    // The very next request at the edge is refused.
    assert_denied(&check(&mut a, check_req(&[("authorization", &h)], &[])).await, "invalid_token");
}

#[tokio::test]
async fn checks_slide_the_idle_expiry_unless_the_route_says_not_to() {
    let infra = Infra::shared();
    let mut f = Fixture::new(config_with_prefix(infra, &redis_prefix())).await;
    // A 16 s idle timeout: a touch is written at most once a second.
    let mut req = create_req("authz-carol", "10.1.2.3");
    req.idle_timeout = Some(prost_types::Duration { seconds: 16, nanos: 0 });
    let created = f.c.create_session(req).await.unwrap().into_inner();
    let created_seen = ms(&created.session.unwrap().last_seen_at);
    let mut a = AuthorizationClient::new(mesh_testkit::channel(f.app.addr).await);
    let h = format!("Bearer {}", created.token);
    let last_seen = |mut c: mesh_proto::session::session_service_client::SessionServiceClient<Channel>,
                     token: String| async move {
        let s =
            c.validate_session(ValidateSessionRequest { token, touch: false }).await.unwrap().into_inner();
        ms(&s.session.unwrap().last_seen_at)
    };
    // Once a touch is due, a route that says `touch: false` does not write one...
    eventually(Duration::from_secs(10), "a touch is due", || async {
        (crate::helpers::now_ms() - created_seen > 1500).then_some(())
    })
    .await;
    check(&mut a, check_req(&[("authorization", &h)], &[("touch", "false")])).await;
    assert_eq!(last_seen(f.c.clone(), created.token.clone()).await, created_seen);
    // ...and a route without the extension (the default: touch) does.
    let r = check(&mut a, check_req(&[("authorization", &h)], &[])).await;
    assert_eq!(r.status.as_ref().map(|s| s.code), Some(0));
    assert!(last_seen(f.c.clone(), created.token.clone()).await > created_seen);
}
