//! The mesh on every call: no valid session, no access (and nothing
//! written); over a rate limit, RESOURCE_EXHAUSTED with RetryInfo (and
//! nothing written); a revoked session is refused on its next call.

use std::time::Duration;

use mesh_proto::{
    data::{GetRequest, PutRequest, QueryRequest},
    session::{
        RevokeSessionRequest, revoke_session_request::Target, session_service_client::SessionServiceClient,
    },
};
use serde_json::json;
use tonic::Code;
use tonic_types::StatusExt;

use crate::helpers::{Fixture, client, doc};

fn put(key: &str) -> PutRequest {
    PutRequest {
        collection: "notes".into(),
        key: key.into(),
        document: Some(doc(json!({"k": key}))),
        expected_version: None,
    }
}

fn get(key: &str) -> GetRequest {
    GetRequest { collection: "notes".into(), key: key.into(), consistency_token: String::new() }
}

#[tokio::test]
async fn calls_without_a_valid_session_are_unauthenticated_and_change_nothing() {
    let _t = mesh_testkit::init_telemetry();
    let f = Fixture::new("grace").await;
    f.c.put(put("mine")).await.unwrap();

    // No token at all.
    let raw = f.c.raw();
    let s = raw.clone().put(put("anon")).await.unwrap_err();
    assert_eq!((s.code(), s.message()), (Code::Unauthenticated, mesh_data::MISSING_TOKEN));
    let s = raw.clone().get(get("mine")).await.unwrap_err();
    assert_eq!(s.code(), Code::Unauthenticated);
    // Not a token, or another scheme.
    for auth in ["Bearer not-a-token", "Basic Z3JhY2U6cHc=", &format!("Bearer {}x", f.token)] {
        let mut req = tonic::Request::new(put("forged"));
        req.metadata_mut().insert("authorization", auth.parse().unwrap());
        let s = raw.clone().put(req).await.unwrap_err();
        assert_eq!(s.code(), Code::Unauthenticated, "{auth}");
        assert!(!s.message().contains(&f.token), "the token is never echoed");
    }
    // A revoked session is refused on its very next call.
    let mut sessions = SessionServiceClient::new(mesh_testkit::channel(f.mesh.session.addr).await);
    sessions
        .revoke_session(RevokeSessionRequest { target: Some(Target::Token(f.token.clone())), client: None })
        .await
        .unwrap();
    let s = f.c.put(put("after-revoke")).await.unwrap_err();
    assert_eq!((s.code(), s.message()), (Code::Unauthenticated, mesh_data::UNAUTHENTICATED));

    // Nothing was written by any of them.
    let other = client(f.app.addr, &f.mesh.token("grace").await);
    for key in ["anon", "forged", "after-revoke"] {
        assert_eq!(other.get(get(key)).await.unwrap_err().code(), Code::NotFound, "{key}");
    }
    assert_eq!(other.get(get("mine")).await.unwrap().version, 1);
}

const STRICT: &str = r#"
domain: data
failure_mode: fail_open
descriptors:
  - key: user_id
    rate_limit: { unit: minute, requests_per_unit: 1000, name: data_per_user }
    descriptors:
      - key: collection
        value: scarce
        rate_limit: { unit: minute, requests_per_unit: 3, name: scarce_per_user }
"#;

#[tokio::test]
async fn calls_over_a_rate_limit_are_refused_with_retry_info_and_change_nothing() {
    let _t = mesh_testkit::init_telemetry();
    let f = Fixture::with_rules("heidi", STRICT, |_| {}).await;
    let scarce = |key: &str| PutRequest { collection: "scarce".into(), ..put(key) };
    for i in 0..3 {
        f.c.put(scarce(&format!("k{i}"))).await.unwrap();
    }
    let s = f.c.put(scarce("k3")).await.unwrap_err();
    assert_eq!(s.code(), Code::ResourceExhausted, "{}", s.message());
    let retry = s.get_details_retry_info().expect("RetryInfo").retry_delay.expect("a delay");
    assert!(retry > Duration::ZERO && retry <= Duration::from_secs(120), "{retry:?}");
    // Reads of the collection count too; other collections and users are not limited.
    let s = f.c.query(QueryRequest { collection: "scarce".into(), ..Default::default() }).await.unwrap_err();
    assert_eq!(s.code(), Code::ResourceExhausted);
    f.c.put(put("elsewhere")).await.unwrap();
    let ivan = client(f.app.addr, &f.mesh.token("ivan").await);
    ivan.put(scarce("ivans")).await.unwrap();
    let s = ivan.get(GetRequest {
        collection: "scarce".into(),
        key: "k3".into(),
        consistency_token: String::new(),
    });
    assert_eq!(s.await.unwrap_err().code(), Code::NotFound, "the refused put wrote nothing");
    assert_eq!(f.metric("mesh_data_ratelimited_total", &[]).await, 2.0);
}

#[tokio::test]
async fn without_the_session_service_calls_are_unavailable_never_let_through() {
    let _t = mesh_testkit::init_telemetry();
    let f = Fixture::new("judy").await;
    f.c.put(put("before")).await.unwrap();
    f.mesh.session.stop().await.unwrap();
    let s = f.c.put(put("during")).await.unwrap_err();
    assert_eq!(s.code(), Code::Unavailable, "{}", s.message());
    assert_eq!(f.c.get(get("before")).await.unwrap_err().code(), Code::Unavailable);
    assert!(crate::helpers::metric(&f.app, "mesh_data_session_unavailable_total", &[]).await >= 2.0);
}

#[tokio::test]
async fn a_hung_session_service_is_unavailable_while_a_short_caller_deadline_is_the_callers() {
    let _t = mesh_testkit::init_telemetry();
    // A peer that accepts connections and never answers: a hung session service.
    let hung = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hung_addr = hung.local_addr().unwrap();
    let _keep = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = hung.accept().await {
            held.push(socket);
        }
    });
    let f = Fixture::with_rules("kate", crate::helpers::OPEN_RULES, move |c| {
        c.clients.session = Some(hung_addr.to_string().parse().unwrap());
        c.data.session_timeout = Duration::from_millis(300);
    })
    .await;
    let c = client(f.app.addr, "any-token");
    // The caller's deadline runs out first: that is the caller's budget.
    let mut req = c.authorize(get("k"));
    req.set_timeout(Duration::from_millis(100));
    let s = c.raw().get(req).await.unwrap_err();
    assert_eq!(s.code(), Code::DeadlineExceeded, "{}", s.message());
    assert_eq!(crate::helpers::metric(&f.app, "mesh_data_session_unavailable_total", &[]).await, 0.0);
    // The service's own session timeout fires: the session service is at fault.
    let s = c.get(get("k")).await.unwrap_err();
    assert_eq!(s.code(), Code::Unavailable, "{}", s.message());
    assert!(crate::helpers::metric(&f.app, "mesh_data_session_unavailable_total", &[]).await >= 1.0);
}
