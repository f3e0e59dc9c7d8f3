//! The counters mean what the README says: `total_hits = within_limit +
//! over_limit` per rule, every per-rule series at 0 before the first Check,
//! and Checks against a domain without rules counted with a bounded label.

use mesh_proto::ratelimit::Code;
use mesh_testkit::Infra;

use crate::helpers::{RulesFile, check, client, config_with, desc, metric, spawn_app};

const RULES: &str = r#"
domain: m
descriptors:
  - key: tight
    rate_limit: { unit: hour, requests_per_unit: 1, name: tight }
  - key: loose
    rate_limit: { unit: hour, requests_per_unit: 100, name: loose }
"#;

const PER_RULE: [&str; 6] = [
    "mesh_ratelimit_total_hits_total",
    "mesh_ratelimit_within_limit_total",
    "mesh_ratelimit_over_limit_total",
    "mesh_ratelimit_near_limit_total",
    "mesh_ratelimit_shadow_mode_total",
    "mesh_ratelimit_over_limit_with_local_cache_total",
];

async fn sample(app: &mesh_testkit::Running, name: &str, rule: &str) -> Option<f64> {
    let text = mesh_testkit::scrape_metrics(app.metrics_addr).await.unwrap();
    mesh_testkit::grpc::metric_value(&text, name, &["domain=\"m\"", &format!("rule=\"{rule}\"")])
}

#[tokio::test]
async fn total_hits_is_within_plus_over_when_another_rule_refuses_the_call() {
    let _t = mesh_testkit::init_telemetry();
    let rules = RulesFile::new(RULES);
    let app = spawn_app(config_with(Infra::shared(), &rules)).await;
    let mut c = client(&app).await;
    for rule in ["tight", "loose"] {
        for name in PER_RULE {
            assert_eq!(sample(&app, name, rule).await, Some(0.0), "{name}{{rule={rule}}} before any check");
        }
    }
    let both = || vec![desc(&[("tight", "u")], None), desc(&[("loose", "u")], Some(3))];
    assert!(check(&mut c, "m", both()).await.ok());
    // `tight` refuses the second call: `loose`'s 3 hits are given back,
    // neither consumed nor refused by `loose`.
    let refused = check(&mut c, "m", both()).await;
    assert_eq!(refused.resp.overall_code(), Code::OverLimit);
    for (rule, within, over) in [("tight", 1.0, 1.0), ("loose", 3.0, 0.0)] {
        let labels = ["domain=\"m\"", &format!("rule=\"{rule}\"")];
        let total = metric(&app, "mesh_ratelimit_total_hits_total", &labels).await;
        assert_eq!(metric(&app, "mesh_ratelimit_within_limit_total", &labels).await, within, "{rule}");
        assert_eq!(metric(&app, "mesh_ratelimit_over_limit_total", &labels).await, over, "{rule}");
        assert_eq!(total, within + over, "{rule}: total_hits is within + over");
    }
    app.stop().await.unwrap();
}

#[tokio::test]
async fn checks_against_a_domain_without_rules_are_counted_with_bounded_labels() {
    let _t = mesh_testkit::init_telemetry();
    let rules = RulesFile::new(RULES);
    let app = spawn_app(config_with(Infra::shared(), &rules)).await;
    let mut c = client(&app).await;
    let name = "mesh_ratelimit_unknown_domain_total";
    assert_eq!(metric(&app, name, &["domain=\"_other\""]).await, 0.0);
    // A typo'd domain is allowed, and counted under its name.
    assert!(check(&mut c, "mm", vec![desc(&[("tight", "u")], None)]).await.ok());
    assert_eq!(metric(&app, name, &["domain=\"mm\""]).await, 1.0);
    // A caller spraying random domains adds at most 32 series.
    for i in 0..100 {
        check(&mut c, &format!("random-{i}"), vec![desc(&[("k", "v")], None)]).await;
    }
    let text = mesh_testkit::scrape_metrics(app.metrics_addr).await.unwrap();
    let series: Vec<f64> = text
        .lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .map(|l| l.rsplit(' ').next().unwrap().parse().unwrap())
        .collect();
    assert_eq!(series.len(), 33, "32 names and _other:\n{text}");
    assert_eq!(series.iter().sum::<f64>(), 101.0, "every check counted once");
    assert_eq!(metric(&app, name, &["domain=\"_other\""]).await, 69.0);
    // A known domain is not counted.
    assert!(check(&mut c, "m", vec![desc(&[("loose", "u")], None)]).await.ok());
    let after: f64 = mesh_testkit::scrape_metrics(app.metrics_addr)
        .await
        .unwrap()
        .lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum();
    assert_eq!(after, 101.0);
    app.stop().await.unwrap();
}
