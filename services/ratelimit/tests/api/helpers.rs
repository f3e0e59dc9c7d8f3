use std::{path::PathBuf, time::Duration};

use mesh_proto::{
    envoy_rls,
    ratelimit::{
        CheckRequest, CheckResponse, Code, Descriptor, Entry, SERVICE_NAME,
        rate_limit_service_client::RateLimitServiceClient,
    },
};
use mesh_ratelimit::{App, Config, DECIDED_BY, EngineConfig};
use mesh_runtime::ServerConfig;
use mesh_testkit::{Infra, Running, redis_prefix, spawn};
use tonic::transport::Channel;

/// Full names the service serves (health and reflection).
pub(crate) const SERVED: &[&str] = &[SERVICE_NAME, envoy_rls::SERVICE_NAME];

/// Configuration against `infra` with a fresh key prefix. The Redis deadline
/// is generous so a loaded CI machine never falls back by accident; tests of
/// the fallback set their own.
pub(crate) fn config(infra: &Infra) -> Config {
    Config {
        server: ServerConfig::for_tests(),
        redis: infra.redis_config(&redis_prefix()),
        rules: None,
        engine: EngineConfig {
            redis_timeout: Duration::from_secs(2),
            rules_poll: Duration::from_millis(50),
            // Long enough that a stalled CI machine never sees a cached key expire mid-test.
            local_cache_recheck: Duration::from_secs(60),
            ..EngineConfig::default()
        },
        audit: None,
    }
}

/// A rules file in a temporary directory.
#[derive(Debug)]
pub(crate) struct RulesFile {
    pub(crate) dir: tempfile::TempDir,
    pub(crate) path: PathBuf,
}

impl RulesFile {
    pub(crate) fn new(yaml: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rules.yaml");
        std::fs::write(&path, yaml).unwrap();
        Self { dir, path }
    }

    /// Replaces the file by an atomic rename, as editors and deploy tools do.
    pub(crate) fn replace(&self, yaml: &str) {
        let tmp = self.dir.path().join(".rules.yaml.tmp");
        std::fs::write(&tmp, yaml).unwrap();
        std::fs::rename(&tmp, &self.path).unwrap();
    }
}

/// Configuration with `rules` loaded.
pub(crate) fn config_with(infra: &Infra, rules: &RulesFile) -> Config {
    Config { rules: Some(rules.path.clone()), ..config(infra) }
}

/// Builds and spawns the service on 127.0.0.1:0.
pub(crate) async fn spawn_app(config: Config) -> Running {
    let app = App::build(config).await.expect("app builds");
    spawn(app.local_addr(), app.metrics_addr(), |sd| app.serve(sd))
}

/// A client of the mesh API, once the service is ready.
pub(crate) async fn client(app: &Running) -> RateLimitServiceClient<Channel> {
    let ch = mesh_testkit::channel(app.addr).await;
    mesh_testkit::wait_for_health(
        &ch,
        "readiness",
        tonic_health::pb::health_check_response::ServingStatus::Serving,
        Duration::from_secs(20),
    )
    .await
    .unwrap();
    RateLimitServiceClient::new(ch)
}

/// A descriptor from `(key, value)` pairs.
pub(crate) fn desc(entries: &[(&str, &str)], hits: Option<u32>) -> Descriptor {
    Descriptor {
        entries: entries.iter().map(|(k, v)| Entry { key: (*k).into(), value: (*v).into() }).collect(),
        hits_addend: hits,
    }
}

/// A Check's answer and what decided it.
#[derive(Debug)]
pub(crate) struct Answer {
    pub(crate) resp: CheckResponse,
    pub(crate) decided_by: String,
}

impl Answer {
    pub(crate) fn ok(&self) -> bool {
        self.resp.overall_code() == Code::Ok
    }

    pub(crate) fn remaining(&self, i: usize) -> u32 {
        self.resp.statuses[i].limit_remaining
    }
}

/// Runs one Check.
pub(crate) async fn check(
    c: &mut RateLimitServiceClient<Channel>,
    domain: &str,
    descriptors: Vec<Descriptor>,
) -> Answer {
    let resp = c
        .check(CheckRequest { domain: domain.into(), descriptors, hits_addend: 0 })
        .await
        .expect("check answers");
    let decided_by = resp.metadata().get(DECIDED_BY).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
    Answer { resp: resp.into_inner(), decided_by }
}

/// One descriptor, one hit.
pub(crate) async fn hit(
    c: &mut RateLimitServiceClient<Channel>,
    domain: &str,
    entries: &[(&str, &str)],
) -> Answer {
    check(c, domain, vec![desc(entries, None)]).await
}

/// The value of a metric sample of the service.
pub(crate) async fn metric(app: &Running, name: &str, labels: &[&str]) -> f64 {
    let text = mesh_testkit::scrape_metrics(app.metrics_addr).await.unwrap();
    mesh_testkit::grpc::metric_value(&text, name, labels).unwrap_or(0.0)
}
