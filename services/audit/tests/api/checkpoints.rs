//! Signed checkpoints outside the database: a superuser who re-chains the
//! log or cuts its tail (triggers disabled) fools Verify, but not
//! `mesh-audit verify --checkpoints`.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use mesh_audit::{chain::Event, checkpoint, export};
use mesh_proto::audit::{ExportRequest, VerifyRequest};
use mesh_testkit::Infra;
use sqlx::{Connection as _, PgConnection};

use crate::helpers::{Fixture, append, cli, event, eventually, superuser_url};

struct Signed {
    f: Fixture,
    /// Holds the key pair and the checkpoint directory.
    _dir: tempfile::TempDir,
    checkpoints: PathBuf,
    public_key: PathBuf,
}

/// A service publishing checkpoints every 50 ms with a key made by `mesh-audit keygen`.
async fn signed() -> Signed {
    let dir = tempfile::tempdir().unwrap();
    let (private_key, public_key) = (dir.path().join("audit.key"), dir.path().join("audit.pub"));
    let (code, out) = cli(&[
        "keygen",
        "--name",
        "mesh.test/audit",
        "--private-key",
        private_key.to_str().unwrap(),
        "--public-key",
        public_key.to_str().unwrap(),
    ])
    .await;
    assert_eq!(code, 0, "{out}");
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&private_key).unwrap().permissions());
    assert_eq!(mode & 0o077, 0, "the private key is readable by its owner only");
    // keygen never overwrites a key
    let (code, _) = cli(&[
        "keygen",
        "--name",
        "x",
        "--private-key",
        private_key.to_str().unwrap(),
        "--public-key",
        dir.path().join("other.pub").to_str().unwrap(),
    ])
    .await;
    assert_eq!(code, 2);
    let checkpoints = dir.path().join("checkpoints");
    let (cp, key) = (checkpoints.clone(), private_key.clone());
    let f = Fixture::with(move |c| {
        c.audit.checkpoint_dir = Some(cp);
        c.audit.checkpoint_key_file = Some(key);
        c.audit.checkpoint_interval = Duration::from_millis(50);
    })
    .await;
    Signed { f, _dir: dir, checkpoints, public_key }
}

impl Signed {
    async fn append_n(&mut self, n: usize) {
        for i in 0..n {
            append(&mut self.f.client, event(&format!("u{i}"), "doc.read"), "").await.unwrap();
        }
    }

    /// Waits until `latest` is signed at `size`.
    async fn published(&self, size: u64) {
        let latest = self.checkpoints.join(checkpoint::LATEST);
        eventually(Duration::from_secs(10), "a checkpoint of the head", || {
            let text = std::fs::read_to_string(&latest).unwrap_or_default();
            async move { (text.lines().nth(1) == Some(size.to_string().as_str())).then_some(()) }
        })
        .await;
    }

    /// `mesh-audit verify [--checkpoints …]`: (exit code, its JSON).
    async fn verify(&self, with_checkpoints: bool) -> (i32, serde_json::Value) {
        let url = Infra::shared().pg_primary_url();
        let mut args = vec!["verify", "--database-url", &url, "--schema", &self.f.db.schema];
        let (cp, key) = (self.checkpoints.to_str().unwrap(), self.public_key.to_str().unwrap());
        if with_checkpoints {
            args.extend(["--checkpoints", cp, "--public-key", key]);
        }
        let (code, out) = cli(&args).await;
        (code, serde_json::from_str(out.trim()).unwrap_or_else(|_| panic!("not JSON: {out}")))
    }

    /// Every event, read back through Export.
    async fn events(&mut self) -> Vec<Event> {
        let mut stream = self.f.client.export(ExportRequest::default()).await.unwrap().into_inner();
        let mut out = Vec::new();
        while let Some(chunk) = stream.message().await.unwrap() {
            out.extend(chunk.lines.lines().map(|l| export::from_json_line(l).unwrap()));
        }
        out
    }
}

/// A superuser connection with triggers off (`session_replication_role = replica`).
async fn superuser(schema: &str) -> PgConnection {
    let mut c = PgConnection::connect(&superuser_url(Infra::shared())).await.unwrap();
    sqlx::query(&format!("set search_path = {schema}")).execute(&mut c).await.unwrap();
    sqlx::query("set session_replication_role = replica").execute(&mut c).await.unwrap();
    c
}

fn sizes(dir: &Path) -> Vec<u64> {
    let mut sizes: Vec<u64> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.unwrap().file_name().to_str()?.strip_suffix(checkpoint::SUFFIX)?.parse().ok())
        .collect();
    sizes.sort_unstable();
    sizes
}

#[tokio::test]
async fn rechaining_as_superuser_fools_verify_but_not_the_signed_checkpoints() {
    let _t = mesh_testkit::init_telemetry();
    let mut s = signed().await;
    s.append_n(5).await;
    s.published(5).await;
    s.append_n(5).await;
    s.published(10).await;
    let (code, report) = s.verify(true).await;
    assert_eq!(code, 0, "an untampered chain passes: {report}");
    assert_eq!(report["checked"], 10);
    assert_eq!(report["newest_checkpoint"], 10);

    // Change event 4, then recompute its hash, every later one and the head.
    let mut events = s.events().await;
    assert_eq!(events.len(), 10);
    let mut su = superuser(&s.f.db.schema).await;
    events[3].action = "doc.deleted".into();
    for i in 3..events.len() {
        let prev = events[i - 1].hash;
        events[i].seal(prev);
        let e = &events[i];
        sqlx::query("update audit_events set action = $1, prev_hash = $2, hash = $3 where sequence = $4")
            .bind(&e.action)
            .bind(e.prev_hash.to_vec())
            .bind(e.hash.to_vec())
            .bind(e.sequence as i64)
            .execute(&mut su)
            .await
            .unwrap();
    }
    sqlx::query("update audit_chain_head set head_hash = $1 where chain = 1")
        .bind(events[9].hash.to_vec())
        .execute(&mut su)
        .await
        .unwrap();

    // The database alone cannot tell.
    let (code, report) = s.verify(false).await;
    assert_eq!((code, &report["ok"]), (0, &serde_json::json!(true)), "{report}");
    let v = eventually(Duration::from_secs(10), "the replica has the rewrite", || {
        let mut c = s.f.client.clone();
        let head = events[9].hash.to_vec();
        async move {
            let v = c.verify(VerifyRequest::default()).await.unwrap().into_inner();
            (v.head_hash == head).then_some(v)
        }
    })
    .await;
    assert!(v.ok, "{v:?}");

    // The checkpoints can: the first one at or after sequence 4 is named.
    let (code, report) = s.verify(true).await;
    assert_eq!(code, 1, "{report}");
    let first_covering = *sizes(&s.checkpoints).iter().find(|n| **n >= 4).unwrap();
    assert_eq!(report["first_bad_sequence"], first_covering, "{report}");
    assert_eq!(report["checkpoint"], checkpoint::file_name(first_covering), "{report}");
    let problem = report["problem"].as_str().unwrap();
    assert!(problem.contains("the chain was rewritten"), "{problem}");
}

#[tokio::test]
async fn cutting_the_tail_as_superuser_fools_verify_but_not_the_signed_checkpoints() {
    let _t = mesh_testkit::init_telemetry();
    let mut s = signed().await;
    s.append_n(10).await;
    s.published(10).await;
    let (code, report) = s.verify(true).await;
    assert_eq!(code, 0, "an untampered chain passes: {report}");

    // Delete events 8 to 10 and move the head back to event 7.
    let events = s.events().await;
    let mut su = superuser(&s.f.db.schema).await;
    sqlx::query("delete from audit_events where sequence > 7").execute(&mut su).await.unwrap();
    sqlx::query(
        "update audit_chain_head set next_sequence = 8, head_hash = $1, recorded_at = $2 where chain = 1",
    )
    .bind(events[6].hash.to_vec())
    .bind(events[6].recorded_at)
    .execute(&mut su)
    .await
    .unwrap();

    let (code, report) = s.verify(false).await;
    assert_eq!(
        (code, &report["checked"]),
        (0, &serde_json::json!(7)),
        "the database alone cannot tell: {report}"
    );

    let (code, report) = s.verify(true).await;
    assert_eq!(code, 1, "{report}");
    assert_eq!(report["first_bad_sequence"], 8, "{report}");
    assert_eq!(report["checkpoint"], checkpoint::file_name(10), "{report}");
    let problem = report["problem"].as_str().unwrap();
    assert!(problem.contains("ends at sequence 7") && problem.contains("size 10"), "{problem}");

    // A checkpoint file changed by hand is named too.
    let file = s.checkpoints.join(checkpoint::file_name(10));
    let forged = std::fs::read_to_string(&file).unwrap().replacen("\n10\n", "\n7\n", 1);
    std::fs::write(&file, forged).unwrap();
    let (code, report) = s.verify(true).await;
    assert_eq!(code, 1, "{report}");
    assert_eq!(report["checkpoint"], checkpoint::file_name(10), "{report}");
    assert!(report["problem"].as_str().unwrap().contains("does not verify"), "{report}");
}
