//! Runnable examples: what calling each mesh service looks like from Rust,
//! with `mesh-client` (the typed clients with the mesh client stack built in).
//!
//! Each example is a function here, run by a thin program in `rust/`
//! (`cargo run -p mesh-examples --example <name>`) and by this crate's tests
//! against services started in-process. A function writes what it did, one
//! line per step, to `out`, and returns an error on the first call that fails.
//!
//! Addresses come from `MESH_SESSION_ADDR`, `MESH_RATELIMIT_ADDR`,
//! `MESH_AUDIT_ADDR` and `MESH_DATA_ADDR` (`host:port` or `http://host:port`),
//! each defaulting to the local stack of `deploy/local/up.sh` (ports
//! 50051–50054); the `MESH_CLIENT_*` variables tune the client stack.
//!
//! # Layout
//! - [`config_from_env`]: the addresses, with the local stack's defaults.
//! - [`session`], [`ratelimit`], [`audit`], [`data`]: one example each.
//! - `python/quickstart.py`: the same from Python grpcio, through reflection.

use std::{io::Write, time::Duration};

use anyhow::Context as _;
use mesh_client::{AuditClient, ClientConfig, ClientMetrics, DataClient, RateLimitClient, SessionClient};
use mesh_proto::{
    audit::{
        Actor, AppendRequest, AuditEvent, EventFilter, Outcome, QueryRequest, Resource, Source, VerifyRequest,
    },
    data::{GetRequest, PutRequest},
    ratelimit::{CheckRequest, Code, Descriptor, Entry, Unit},
    session::{
        ClientInfo, CreateSessionRequest, RevokeSessionRequest, ValidateSessionRequest,
        revoke_session_request,
    },
};

/// The local stack's addresses (`deploy/local/up.sh`), by variable.
pub const LOCAL_DEFAULTS: [(&str, &str); 4] = [
    ("MESH_SESSION_ADDR", "http://127.0.0.1:50051"),
    ("MESH_RATELIMIT_ADDR", "http://127.0.0.1:50052"),
    ("MESH_AUDIT_ADDR", "http://127.0.0.1:50053"),
    ("MESH_DATA_ADDR", "http://127.0.0.1:50054"),
];

/// How long an example waits for an asynchronous effect (an audit event
/// reaching the replica Query reads from).
pub const EFFECT_TIMEOUT: Duration = Duration::from_secs(15);

/// The client configuration from the environment, each unset address
/// defaulting to the local stack ([`LOCAL_DEFAULTS`]). Errors name the
/// variable that does not parse.
pub fn config_from_env() -> anyhow::Result<ClientConfig> {
    let mut config = ClientConfig::from_env()?;
    let [session, ratelimit, audit, data] = LOCAL_DEFAULTS.map(|(_, addr)| addr.parse().ok());
    config.session = config.session.or(session);
    config.ratelimit = config.ratelimit.or(ratelimit);
    config.audit = config.audit.or(audit);
    config.data = config.data.or(data);
    Ok(config)
}

/// The user the programs act as: their first argument, else `alice`.
pub fn user_from_args() -> String {
    std::env::args().nth(1).unwrap_or_else(|| "alice".to_owned())
}

/// Session: CreateSession for `user` → ValidateSession with the token →
/// RevokeSession → ValidateSession again, which must answer UNAUTHENTICATED.
/// Prints `validated session <id> of user <user>`. Errors: any call failing,
/// or a revoked token still validating. The token itself is never printed.
pub async fn session(config: &ClientConfig, user: &str, out: &mut impl Write) -> anyhow::Result<()> {
    let c = SessionClient::from_config(config, &ClientMetrics::default())?;
    let created = c
        .create_session(CreateSessionRequest {
            user_id: user.to_owned(),
            attributes: [("device".to_owned(), "example".to_owned())].into(),
            client: Some(ClientInfo { ip: "127.0.0.1".into(), user_agent: "mesh-examples/0.1".into() }),
            ..Default::default()
        })
        .await
        .context("CreateSession")?;
    let s = created.session.context("CreateSession answered no session")?;
    writeln!(
        out,
        "created session {} for user {} (token: {} characters)",
        s.id,
        s.user_id,
        created.token.len()
    )?;

    let validated = c
        .validate_session(ValidateSessionRequest { token: created.token.clone(), touch: true })
        .await
        .context("ValidateSession")?
        .session
        .context("ValidateSession answered no session")?;
    writeln!(
        out,
        "validated session {} of user {} (device={})",
        validated.id,
        validated.user_id,
        validated.attributes.get("device").map_or("-", String::as_str)
    )?;

    let revoked = c
        .revoke_session(RevokeSessionRequest {
            target: Some(revoke_session_request::Target::Token(created.token.clone())),
            client: None,
        })
        .await
        .context("RevokeSession")?;
    writeln!(out, "revoked session {}: {}", s.id, revoked.revoked)?;

    match c.validate_session(ValidateSessionRequest { token: created.token, touch: false }).await {
        Err(status) if status.code() == tonic::Code::Unauthenticated => {
            writeln!(out, "validating the revoked token answers {:?}", status.code())?;
        }
        Err(status) => return Err(status).context("ValidateSession after revoke"),
        Ok(_) => anyhow::bail!("the revoked token still validates"),
    }
    Ok(())
}

/// Rate limit: one Check in domain `api` (the example domain of
/// `deploy/local/ratelimit.yaml`) with two descriptors decided together —
/// `[route=search, user_id=<user>]` and `[endpoint=search]` — and one line
/// per descriptor: `<limit name>: <code>, <remaining> of <n>/<unit> remaining`.
pub async fn ratelimit(config: &ClientConfig, user: &str, out: &mut impl Write) -> anyhow::Result<()> {
    let c = RateLimitClient::from_config(config, &ClientMetrics::default())?;
    let entry = |key: &str, value: &str| Entry { key: key.into(), value: value.into() };
    let descriptors = vec![
        Descriptor { entries: vec![entry("route", "search"), entry("user_id", user)], hits_addend: None },
        Descriptor { entries: vec![entry("endpoint", "search")], hits_addend: None },
    ];
    let resp =
        c.check(CheckRequest { domain: "api".into(), descriptors, hits_addend: 1 }).await.context("Check")?;
    writeln!(out, "check domain api: overall {}", code_name(resp.overall_code))?;
    for status in &resp.statuses {
        match &status.current_limit {
            Some(limit) => writeln!(
                out,
                "  {}: {}, {} of {}/{} remaining",
                limit.name,
                code_name(status.code),
                status.limit_remaining,
                limit.requests_per_unit,
                unit_name(limit.unit)
            )?,
            None => writeln!(out, "  (no rule matches): {}", code_name(status.code))?,
        }
    }
    Ok(())
}

fn unit_name(unit: i32) -> String {
    Unit::try_from(unit).map_or("?", |u| u.as_str_name().trim_start_matches("UNIT_")).to_lowercase()
}

fn code_name(code: i32) -> &'static str {
    Code::try_from(code).map_or("CODE_UNKNOWN", |c| c.as_str_name())
}

/// Audit: Append an event by `user` with an idempotency key, Append it again
/// with the same key (the service answers the first result, no second row),
/// Query the user's events (waiting up to [`EFFECT_TIMEOUT`] for the replica
/// Query reads from), and Verify the hash chain. Errors: any call failing,
/// the retry getting a different sequence, the event never showing, or a
/// chain that does not verify.
pub async fn audit(config: &ClientConfig, user: &str, out: &mut impl Write) -> anyhow::Result<()> {
    let c = AuditClient::from_config(config, &ClientMetrics::default())?;
    let event = AuditEvent {
        actor: Some(Actor { r#type: "user".into(), id: user.into() }),
        action: "example.login".into(),
        resource: Some(Resource { r#type: "example".into(), id: format!("example/{user}") }),
        outcome: Outcome::Success.into(),
        source: Some(Source {
            ip: "127.0.0.1".into(),
            user_agent: "mesh-examples/0.1".into(),
            service: "mesh-examples".into(),
        }),
        ..Default::default()
    };
    // A key unique to this action: a retry of the same Append sends the same key.
    let key = format!("example-login-{user}-{}", std::process::id());
    let append = AppendRequest { event: Some(event), idempotency_key: key.clone() };
    let first = c.append(append.clone()).await.context("Append")?;
    writeln!(out, "appended event {} at sequence {} (idempotency key {key})", first.id, first.sequence)?;
    let again = c.append(append).await.context("Append again")?;
    anyhow::ensure!(again.sequence == first.sequence, "the retried Append made a second event");
    writeln!(
        out,
        "appended again with the same key: same event {} at sequence {}",
        again.id, again.sequence
    )?;

    let filter = EventFilter { actor_id: user.into(), ..Default::default() };
    let deadline = tokio::time::Instant::now() + EFFECT_TIMEOUT;
    let events = loop {
        let page = c
            .query(QueryRequest { filter: Some(filter.clone()), page_size: 100, page_token: String::new() })
            .await
            .context("Query")?;
        if page.events.iter().any(|e| e.sequence == first.sequence) {
            break page.events;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "event {} not queryable within {EFFECT_TIMEOUT:?}",
            first.id
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    writeln!(out, "query actor_id={user}: {} event(s)", events.len())?;
    for e in &events {
        writeln!(
            out,
            "  #{} {} {} by {} on {}",
            e.sequence,
            e.action,
            Outcome::try_from(e.outcome).map_or("OUTCOME_UNKNOWN", |o| o.as_str_name()),
            e.actor.as_ref().map_or("-", |a| a.id.as_str()),
            e.resource.as_ref().map_or("-", |r| r.id.as_str())
        )?;
    }

    let verified = c.verify(VerifyRequest { from_sequence: 0, to_sequence: 0 }).await.context("Verify")?;
    writeln!(out, "verify chain: ok={} checked={}", verified.ok, verified.checked)?;
    anyhow::ensure!(verified.ok, "the audit chain does not verify: {}", verified.problem);
    Ok(())
}

/// Data: sign in as `user` (session CreateSession), Put a document under
/// `notes/<user>-example` with the token, Get it back, show that a call
/// without a token is refused (every data call is validated through
/// session), read what rate-limit counted for the user and collection
/// (domain `data`, without consuming), and Query audit for the write's event (the data service records
/// each write through its outbox). Errors: any call failing, a token-less
/// call accepted, or the audit event not appearing within [`EFFECT_TIMEOUT`].
pub async fn data(config: &ClientConfig, user: &str, out: &mut impl Write) -> anyhow::Result<()> {
    let metrics = ClientMetrics::default();
    let session = SessionClient::from_config(config, &metrics)?;
    let token = session
        .create_session(CreateSessionRequest { user_id: user.into(), ..Default::default() })
        .await
        .context("CreateSession")?
        .token;
    writeln!(out, "session: signed in as {user}")?;

    let anonymous = DataClient::from_config(config, &metrics)?;
    let c = anonymous.with_token(&token.into()).context("the token is not a valid header value")?;
    let (collection, key) = ("notes", format!("{user}-example"));
    let document = mesh_proto::json::from_json(
        serde_json::json!({ "title": "hello mesh", "tags": ["example"], "owner": user })
            .as_object()
            .expect("an object"),
    );
    let put = c
        .put(PutRequest {
            collection: collection.into(),
            key: key.clone(),
            document: Some(document),
            expected_version: None,
        })
        .await
        .context("Put")?;
    writeln!(out, "data: put {collection}/{key} version {}", put.version)?;

    let got = c
        .get(GetRequest {
            collection: collection.into(),
            key: key.clone(),
            consistency_token: put.consistency_token,
        })
        .await
        .context("Get")?;
    let doc = got.document.as_ref().map_or_else(|| "null".to_owned(), mesh_proto::json::to_json);
    writeln!(out, "data: get {collection}/{key} version {} = {doc}", got.version)?;

    match anonymous
        .get(GetRequest { collection: collection.into(), key: key.clone(), ..Default::default() })
        .await
    {
        Err(status) if status.code() == tonic::Code::Unauthenticated => {
            writeln!(out, "session: a Get without a token answers {:?}", status.code())?;
        }
        Err(status) => return Err(status).context("Get without a token"),
        Ok(_) => anyhow::bail!("a Get without a token was served"),
    }

    // What the data service counted: a Check that consumes nothing (a
    // descriptor's hits_addend 0) on the [user_id, collection] counter it
    // charges every call to.
    let entry = |key: &str, value: &str| Entry { key: key.into(), value: value.into() };
    let peek = RateLimitClient::from_config(config, &metrics)?
        .check(CheckRequest {
            domain: "data".into(),
            descriptors: vec![Descriptor {
                entries: vec![entry("user_id", user), entry("collection", collection)],
                hits_addend: Some(0),
            }],
            hits_addend: 0,
        })
        .await
        .context("ratelimit Check")?;
    if let Some(status) = peek.statuses.first()
        && let Some(limit) = &status.current_limit
    {
        writeln!(
            out,
            "ratelimit: {} has {} of {}/{} left for {user} in {collection}",
            limit.name,
            status.limit_remaining,
            limit.requests_per_unit,
            unit_name(limit.unit)
        )?;
    }

    let audit = AuditClient::from_config(config, &metrics)?;
    let resource = format!("{collection}/{key}");
    let filter = EventFilter { resource_id: resource.clone(), actor_id: user.into(), ..Default::default() };
    let deadline = tokio::time::Instant::now() + EFFECT_TIMEOUT;
    let event = loop {
        let page = audit
            .query(QueryRequest { filter: Some(filter.clone()), page_size: 10, page_token: String::new() })
            .await
            .context("audit Query")?;
        if let Some(e) = page.events.into_iter().next() {
            break e;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "no audit event for {resource} within {EFFECT_TIMEOUT:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    writeln!(
        out,
        "audit: event #{} {} by {} on {}",
        event.sequence,
        event.action,
        event.actor.as_ref().map_or("-", |a| a.id.as_str()),
        event.resource.as_ref().map_or("-", |r| r.id.as_str())
    )?;
    Ok(())
}
