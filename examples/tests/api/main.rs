//! Every example, run against real services started in this process: the
//! Rust examples as library functions, the Python quickstart as a child
//! process with `.local/tools/venv/bin/python`. Each test asserts what the
//! example printed, not only that it succeeded.

mod helpers;

use helpers::{Stack, printed};
use mesh_testkit::repo_root;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_example_creates_validates_and_revokes() {
    let _t = mesh_testkit::init_telemetry();
    let stack = Stack::default().with_ratelimit().await.with_session().await;
    let mut out = Vec::new();
    let r = mesh_examples::session(&stack.clients(), "ada", &mut out).await;
    let out = printed(r, out);

    let id = out
        .lines()
        .find_map(|l| {
            l.strip_prefix("created session ")?.split_once(" for user ada ").map(|(id, _)| id.to_owned())
        })
        .unwrap_or_else(|| panic!("no created line for ada:\n{out}"));
    assert!(out.contains(&format!("validated session {id} of user ada (device=example)")), "{out}");
    assert!(out.contains(&format!("revoked session {id}: true")), "{out}");
    assert!(out.contains("validating the revoked token answers Unauthenticated"), "{out}");
}

/// The program itself (`cargo run --example session`), not only its
/// function: it finds the service through `MESH_SESSION_ADDR`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_example_program_reads_its_address_from_the_environment() {
    let _t = mesh_testkit::init_telemetry();
    let stack = Stack::default().with_ratelimit().await.with_session().await;
    // Test binaries are in target/<profile>/deps, examples in target/<profile>/examples.
    let exe = std::env::current_exe().unwrap();
    let program = exe.parent().unwrap().parent().unwrap().join("examples/session");
    assert!(program.exists(), "{} not built (cargo builds examples with the tests)", program.display());
    let out = tokio::process::Command::new(&program)
        .arg("lin")
        .envs(stack.env())
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the session example failed:\n{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("validated session ") && l.ends_with(" of user lin (device=example)")),
        "{stdout}"
    );
    assert!(stdout.contains("validating the revoked token answers Unauthenticated"), "{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ratelimit_example_prints_the_remaining_of_both_descriptors() {
    let _t = mesh_testkit::init_telemetry();
    let stack = Stack::default().with_ratelimit().await;
    let mut out = Vec::new();
    let r = mesh_examples::ratelimit(&stack.clients(), "ada", &mut out).await;
    let out = printed(r, out);
    // The shipped rules: search 100/minute per user, 1000/minute per endpoint; this is the first hit.
    assert!(out.contains("check domain api: overall CODE_OK"), "{out}");
    assert!(out.contains("search_per_user: CODE_OK, 99 of 100/minute remaining"), "{out}");
    assert!(out.contains("endpoint_global: CODE_OK, 999 of 1000/minute remaining"), "{out}");

    // A second run counts again: the remaining goes down.
    let mut again = Vec::new();
    let r = mesh_examples::ratelimit(&stack.clients(), "ada", &mut again).await;
    let again = printed(r, again);
    assert!(again.contains("search_per_user: CODE_OK, 98 of 100/minute remaining"), "{again}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_example_appends_once_queries_and_verifies() {
    let _t = mesh_testkit::init_telemetry();
    let stack = Stack::default().with_audit().await;
    let mut out = Vec::new();
    let r = mesh_examples::audit(&stack.clients(), "ada", &mut out).await;
    let out = printed(r, out);

    let (id, seq) = out
        .lines()
        .find_map(|l| {
            let rest = l.strip_prefix("appended event ")?;
            let (id, rest) = rest.split_once(" at sequence ")?;
            Some((id.to_owned(), rest.split_whitespace().next()?.to_owned()))
        })
        .unwrap_or_else(|| panic!("no appended line:\n{out}"));
    assert!(
        out.contains(&format!("appended again with the same key: same event {id} at sequence {seq}")),
        "{out}"
    );
    // The retry made no second row: the user has exactly one event.
    assert!(out.contains("query actor_id=ada: 1 event(s)"), "{out}");
    assert!(out.contains(&format!("#{seq} example.login OUTCOME_SUCCESS by ada on example/ada")), "{out}");
    assert!(out.contains("verify chain: ok=true checked=1"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_example_goes_through_session_ratelimit_and_audit() {
    let _t = mesh_testkit::init_telemetry();
    let stack =
        Stack::default().with_ratelimit().await.with_session().await.with_audit().await.with_data().await;
    let mut out = Vec::new();
    let r = mesh_examples::data(&stack.clients(), "ada", &mut out).await;
    let out = printed(r, out);

    assert!(out.contains("session: signed in as ada"), "{out}");
    assert!(out.contains("data: put notes/ada-example version 1"), "{out}");
    let got = out
        .lines()
        .find_map(|l| l.strip_prefix("data: get notes/ada-example version 1 = "))
        .unwrap_or_else(|| panic!("no get line:\n{out}"));
    let doc: serde_json::Value = serde_json::from_str(got).unwrap();
    assert_eq!(doc, serde_json::json!({ "title": "hello mesh", "tags": ["example"], "owner": "ada" }));
    assert!(out.contains("session: a Get without a token answers Unauthenticated"), "{out}");
    // The Put and the Get were each counted once; the token-less Get never reached rate-limit.
    assert!(
        out.contains("ratelimit: data_per_user_collection has 2998 of 3000/minute left for ada in notes"),
        "{out}"
    );
    assert!(
        out.lines()
            .any(|l| l.starts_with("audit: event #")
                && l.ends_with(" document.put by ada on notes/ada-example")),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_quickstart_checks_a_limit_and_validates_a_session() {
    let _t = mesh_testkit::init_telemetry();
    let stack = Stack::default().with_ratelimit().await.with_session().await;
    let python = mesh_testkit::conformance::python_with_grpcio().await.unwrap();
    let out = tokio::process::Command::new(&python)
        .arg(repo_root().join("examples/python/quickstart.py"))
        .arg("grace")
        .envs(stack.env())
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "quickstart.py failed:\n{stdout}{}", String::from_utf8_lossy(&out.stderr));

    assert!(stdout.contains("ratelimit check: overall CODE_OK"), "{stdout}");
    assert!(stdout.contains("search_per_user: 99 of 100 remaining"), "{stdout}");
    assert!(stdout.contains("endpoint_global: 999 of 1000 remaining"), "{stdout}");
    let id = stdout
        .lines()
        .find_map(|l| l.strip_prefix("session created: ")?.strip_suffix(" for user grace"))
        .unwrap_or_else(|| panic!("no created line for grace:\n{stdout}"));
    assert!(stdout.contains(&format!("session validated: {id} of user grace")), "{stdout}");
}
