//! Boot, health, reflection, dependency loss and shutdown.

use std::time::Duration;

use mesh_testkit::{
    Infra, PrivateInfra,
    conformance::{self, WhileDown},
};

use crate::helpers::{RulesFile, SERVED, client, config, config_with, hit, spawn_app};

#[tokio::test]
async fn serves_health_and_reflection() {
    let _t = mesh_testkit::init_telemetry();
    let app = spawn_app(config(Infra::shared())).await;
    conformance::assert_serving(app.addr, SERVED, Duration::from_secs(10)).await.unwrap();
    conformance::assert_reflection(app.addr, SERVED).await.unwrap();
    app.stop().await.unwrap();
}

const FAILURE_MODES: &str = r#"
domain: open
failure_mode: fail_open
descriptors:
  - key: user
    rate_limit: { unit: hour, requests_per_unit: 1000 }
---
domain: closed
failure_mode: fail_closed
descriptors:
  - key: user
    rate_limit: { unit: hour, requests_per_unit: 1000 }
"#;

/// Redis down, every domain still answers by its failure mode: the pod
/// stays ready (behind a Service the degraded mode is reached) and the loss
/// is reported as `dependency:redis` and `mesh_dependency_up{dependency="redis"} 0`.
#[tokio::test]
async fn readiness_stays_while_redis_is_down_and_the_failure_modes_answer() {
    let _t = mesh_testkit::init_telemetry();
    let private = PrivateInfra::new();
    private.start_redis().await.unwrap();
    let rules = RulesFile::new(FAILURE_MODES);
    let mut config = config_with(&private.infra, &rules);
    config.engine.redis_timeout = Duration::from_millis(100);
    let app = spawn_app(config).await;
    let c = client(&app).await;
    assert_eq!(hit(&mut c.clone(), "open", &[("user", "u1")]).await.decided_by, "redis");

    let took = conformance::assert_dependency_loss(
        &app,
        SERVED,
        "redis",
        WhileDown::StaysReady,
        Duration::from_secs(5),
        async {
            private.stop_redis().await?;
            // Answers keep coming, each domain by its failure mode.
            mesh_testkit::eventually(Duration::from_secs(10), "the failure modes decide", || {
                let mut c = c.clone();
                async move {
                    let open = hit(&mut c, "open", &[("user", "u1")]).await;
                    let closed = hit(&mut c, "closed", &[("user", "u1")]).await;
                    (open.decided_by == "fail-open" && closed.decided_by == "fail-closed").then(|| {
                        assert!(open.ok(), "fail_open allows within the local limits");
                        assert!(!closed.ok(), "fail_closed refuses");
                    })
                }
            })
            .await;
            Ok(())
        },
        private.start_redis(),
    )
    .await
    .unwrap();
    eprintln!("dependency:redis NOT_SERVING {took:?} after the redis cluster stopped");
    app.stop().await.unwrap();
}

#[tokio::test]
async fn sigterm_drains_and_exits_zero() {
    let env = Infra::shared().env("unused", &mesh_testkit::redis_prefix());
    conformance::assert_binary_serves_and_drains(env!("CARGO_BIN_EXE_mesh-ratelimit"), SERVED, env)
        .await
        .unwrap();
}

#[tokio::test]
async fn bad_configuration_exits_64() {
    conformance::assert_bad_configuration_exits_64(env!("CARGO_BIN_EXE_mesh-ratelimit")).await.unwrap();
}
