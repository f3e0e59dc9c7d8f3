//! Export as JSON lines (RPC and command line) and offline verification of an export.

use futures::StreamExt as _;
use mesh_proto::audit::{EventFilter, ExportRequest, Outcome};
use mesh_testkit::Infra;

use crate::helpers::{Fixture, append, cli_full as cli, event};

#[tokio::test]
async fn export_streams_json_lines_that_verify_offline() {
    let _t = mesh_testkit::init_telemetry();
    let mut f = Fixture::new().await;
    for i in 0..25 {
        let mut e = event(&format!("a{}", i % 2), "export.me");
        if i % 4 == 0 {
            e.outcome = Outcome::Failure as i32;
        }
        append(&mut f.client, e, "").await.unwrap();
    }

    // the RPC, filtered and ranged
    let req = ExportRequest {
        filter: Some(EventFilter { actor_id: "a1".into(), ..Default::default() }),
        from_sequence: 5,
        to_sequence: 20,
    };
    let mut stream = f.client.export(req).await.unwrap().into_inner();
    let mut lines = String::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.unwrap();
        assert!(chunk.lines.ends_with('\n'));
        lines.push_str(&chunk.lines);
    }
    let sequences: Vec<u64> = lines
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            assert_eq!(v["actor"]["id"], "a1");
            assert_eq!(v["hash"].as_str().unwrap().len(), 64);
            v["sequence"].as_u64().unwrap()
        })
        .collect();
    assert_eq!(sequences, (5..=20).filter(|s| (s - 1) % 2 == 1).collect::<Vec<_>>());

    // the command line, everything, then verified without the database
    let url = Infra::shared().pg_primary_url();
    let (code, out, err) = cli(&["export", "--database-url", &url, "--schema", &f.db.schema]).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.lines().count(), 25);
    assert!(!err.contains("mesh:mesh"), "the URL's password is never printed: {err}");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    std::fs::write(&path, &out).unwrap();
    let (code, report, err) = cli(&["verify", "--file", path.to_str().unwrap()]).await;
    assert_eq!(code, 0, "{report}{err}");
    let report: serde_json::Value = serde_json::from_str(report.trim()).unwrap();
    assert_eq!(report["checked"], 25);

    // one altered character in the archive is caught
    let tampered = out.replacen("export.me", "export.mE", 1);
    std::fs::write(&path, tampered).unwrap();
    let (code, report, _) = cli(&["verify", "--file", path.to_str().unwrap()]).await;
    assert_eq!(code, 1, "{report}");
    let report: serde_json::Value = serde_json::from_str(report.trim()).unwrap();
    assert_eq!(report["first_bad_sequence"], 1);

    // a bad URL is refused without echoing it
    let (code, _, err) =
        cli(&["export", "--database-url", "postgres://u:s3cret@[bad", "--schema", "x"]).await;
    assert_eq!(code, 2);
    assert!(!err.contains("s3cret"), "{err}");
}
