//! Rules: hot reload (atomic rename, ConfigMap-style directories), bad
//! files, GetRules and Reset.

use std::time::Duration;

use mesh_proto::ratelimit::{
    Descriptor, Entry, FailureMode, GetRulesRequest, ResetRequest, Unit,
    rate_limit_service_client::RateLimitServiceClient,
};
use mesh_ratelimit::Config;
use mesh_testkit::{Infra, Process, free_addr};
use tonic::transport::Channel;

use crate::helpers::{RulesFile, client, config, config_with, hit, metric, spawn_app};

fn rules(rpu: u32) -> String {
    format!(
        "domain: api\nfailure_mode: fail_closed\ndescriptors:\n  - key: user\n    rate_limit: {{ unit: hour, requests_per_unit: {rpu}, name: per_user }}\n"
    )
}

async fn limit_of(c: &mut RateLimitServiceClient<Channel>) -> Option<u32> {
    let r = c.get_rules(GetRulesRequest { domain: "api".into() }).await.ok()?.into_inner();
    Some(r.descriptors[0].rate_limit.as_ref()?.requests_per_unit)
}

/// Polls until GetRules reports `rpu` (reload is asynchronous by design).
async fn wait_for_limit(c: &mut RateLimitServiceClient<Channel>, rpu: u32) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while limit_of(c).await != Some(rpu) {
        assert!(tokio::time::Instant::now() < deadline, "rules never reloaded to {rpu}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test]
async fn rules_hot_reload_on_atomic_rename_and_bad_files_keep_the_old_rules() {
    let _t = mesh_testkit::init_telemetry();
    let file = RulesFile::new(&rules(2));
    let app = spawn_app(config_with(Infra::shared(), &file)).await;
    let mut c = client(&app).await;

    let r = c.get_rules(GetRulesRequest { domain: "api".into() }).await.unwrap().into_inner();
    assert_eq!(r.failure_mode(), FailureMode::FailClosed);
    assert_eq!(r.source, file.path.display().to_string());
    let rl = r.descriptors[0].rate_limit.clone().unwrap();
    assert_eq!((rl.name.as_str(), rl.requests_per_unit, rl.unit()), ("per_user", 2, Unit::Hour));
    assert!(hit(&mut c, "api", &[("user", "1")]).await.ok());
    assert!(hit(&mut c, "api", &[("user", "1")]).await.ok());
    assert!(!hit(&mut c, "api", &[("user", "1")]).await.ok());

    // A new limit by atomic rename: the same counter now allows up to 4.
    file.replace(&rules(4));
    wait_for_limit(&mut c, 4).await;
    assert!(hit(&mut c, "api", &[("user", "1")]).await.ok(), "the over-limit cache was cleared on reload");
    assert!(hit(&mut c, "api", &[("user", "1")]).await.ok());
    assert!(!hit(&mut c, "api", &[("user", "1")]).await.ok());

    // A bad file: the old rules stay, the failure is counted.
    file.replace("domain: api\ndescriptors:\n  - key: user\n    rate_limit: { unit: fortnight, requests_per_unit: 1 }\n");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while metric(&app, "mesh_ratelimit_rule_reloads_total", &["result=\"error\""]).await < 1.0 {
        assert!(tokio::time::Instant::now() < deadline, "the bad file was never noticed");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(limit_of(&mut c).await, Some(4));
    assert!(!hit(&mut c, "api", &[("user", "1")]).await.ok());

    // Fixed again: reloads.
    file.replace(&rules(6));
    wait_for_limit(&mut c, 6).await;
    app.stop().await.unwrap();
}

#[tokio::test]
async fn a_configmap_directory_reloads_on_its_symlink_swap() {
    let _t = mesh_testkit::init_telemetry();
    // The layout kubelet makes: files are links into `..data`, itself a link
    // to a timestamped directory that is swapped atomically on update.
    let dir = tempfile::tempdir().unwrap();
    let write_version = |name: &str, rpu: u32| {
        let v = dir.path().join(name);
        std::fs::create_dir(&v).unwrap();
        std::fs::write(v.join("api.yaml"), rules(rpu)).unwrap();
        std::fs::write(v.join("other.yaml"), "domain: other\n---\ndomain: third\n").unwrap();
        let tmp = dir.path().join("..data_tmp");
        std::os::unix::fs::symlink(name, &tmp).unwrap();
        std::fs::rename(&tmp, dir.path().join("..data")).unwrap();
    };
    write_version("..v1", 3);
    for f in ["api.yaml", "other.yaml"] {
        std::os::unix::fs::symlink(format!("..data/{f}"), dir.path().join(f)).unwrap();
    }
    let app = spawn_app(Config { rules: Some(dir.path().to_owned()), ..config(Infra::shared()) }).await;
    let mut c = client(&app).await;
    assert_eq!(limit_of(&mut c).await, Some(3));
    assert!(c.get_rules(GetRulesRequest { domain: "third".into() }).await.is_ok());
    write_version("..v2", 7);
    wait_for_limit(&mut c, 7).await;
    app.stop().await.unwrap();
}

#[tokio::test]
async fn reset_forgets_a_counter_and_get_rules_knows_its_domains() {
    let _t = mesh_testkit::init_telemetry();
    let file = RulesFile::new(&rules(1));
    let app = spawn_app(config_with(Infra::shared(), &file)).await;
    let mut c = client(&app).await;
    assert!(hit(&mut c, "api", &[("user", "9")]).await.ok());
    assert!(!hit(&mut c, "api", &[("user", "9")]).await.ok());
    let descriptor = |v: &str| Descriptor {
        entries: vec![Entry { key: "user".into(), value: v.into() }],
        hits_addend: None,
    };
    c.reset(ResetRequest { domain: "api".into(), descriptor: Some(descriptor("9")) }).await.unwrap();
    assert!(hit(&mut c, "api", &[("user", "9")]).await.ok());

    let e =
        c.reset(ResetRequest { domain: "nope".into(), descriptor: Some(descriptor("9")) }).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);
    let e = c.reset(ResetRequest { domain: "api".into(), descriptor: None }).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    let e = c.get_rules(GetRulesRequest { domain: "nope".into() }).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);
    app.stop().await.unwrap();
}

#[tokio::test]
async fn a_bad_rules_file_at_startup_exits_64() {
    let file = RulesFile::new("domain: api\ndescriptors:\n  - key: user\n    rate_limit: { unit: minute }\n");
    let mut env = vec![
        ("MESH_LISTEN_ADDR".to_owned(), free_addr().to_string()),
        ("MESH_METRICS_ADDR".to_owned(), free_addr().to_string()),
        ("MESH_RATELIMIT_RULES".to_owned(), file.path.display().to_string()),
    ];
    env.extend(Infra::shared().env("unused", &mesh_testkit::redis_prefix()));
    let mut process = Process::start(env!("CARGO_BIN_EXE_mesh-ratelimit"), &env).unwrap();
    let status = process.wait(Duration::from_secs(10)).await.unwrap();
    assert_eq!(status.code(), Some(64));
}
