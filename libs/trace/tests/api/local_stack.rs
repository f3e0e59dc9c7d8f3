//! deploy/local/lib.sh's process handling as up.sh uses it: a process is
//! left running when nothing it depends on changed, restarted when its
//! environment (or binary) changed, with the changed names said; the
//! banner's traces line; the env file that puts the tools on PATH.
//! Run against a stand-in service (a script that records its environment),
//! in a private state directory: nothing of the shared stack is touched.

use std::{
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use mesh_testkit::repo_root;

struct Local {
    dir: tempfile::TempDir,
    fake: PathBuf,
}

/// Kills the stand-in (a process this test started) however the test ends.
impl Drop for Local {
    fn drop(&mut self) {
        if let Ok(pid) = std::fs::read_to_string(self.dir.path().join("run/fake.pid")) {
            let _ = Command::new("kill").arg(pid.trim()).status();
        }
    }
}

struct Run {
    stdout: String,
    stderr: String,
}

impl Local {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let fake = dir.path().join("fake-service");
        std::fs::write(
            &fake,
            "#!/usr/bin/env bash\n\
             echo \"started RUST_LOG=${RUST_LOG-} endpoint=${OTEL_EXPORTER_OTLP_ENDPOINT-} exporter=${OTEL_TRACES_EXPORTER-}\"\n\
             exec sleep 600\n",
        )
        .unwrap();
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
        Self { dir, fake }
    }

    /// Runs `script` after sourcing lib.sh, with only `env` (and PATH) set.
    fn run(&self, env: &[(&str, &str)], script: &str) -> Run {
        let lib = repo_root().join("deploy/local/lib.sh");
        let out = Command::new("bash")
            .arg("-c")
            .arg(format!("source {}\n{script}", lib.display()))
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap())
            .env("MESH_LOCAL_DIR", self.dir.path())
            .env("FAKE", &self.fake)
            .envs(env.iter().copied())
            .output()
            .unwrap();
        let run = Run {
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        };
        assert!(out.status.success(), "{script}\n{}{}", run.stdout, run.stderr);
        run
    }

    /// up.sh's step for one service: (action, pid, what up.sh said).
    fn ensure(&self, env: &[(&str, &str)]) -> (String, u32, String) {
        let r = self.run(
            env,
            r#"svc_ensure fake "" "$(svc_env)" "$FAKE"; echo "$SVC_ACTION $(cat "$RUN_DIR/fake.pid")""#,
        );
        let (action, pid) = r.stdout.trim().split_once(' ').unwrap();
        (action.to_owned(), pid.parse().unwrap(), r.stderr)
    }

    fn log(&self) -> Vec<String> {
        std::fs::read_to_string(self.dir.path().join("run/fake.log"))
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    async fn wait_started(&self, n: usize) -> Vec<String> {
        mesh_testkit::eventually(Duration::from_secs(10), "the stand-in started", || async {
            let log = self.log();
            (log.len() >= n).then_some(log)
        })
        .await
    }
}

fn alive(pid: u32) -> bool {
    // A zombie is not alive; /proc/<pid>/stat's third field says Z.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| s.rsplit(')').next().is_some_and(|rest| !rest.trim_start().starts_with('Z')))
}

#[tokio::test]
async fn up_restarts_a_service_exactly_when_its_environment_or_binary_changed() {
    let local = Local::new();
    let a = [("RUST_LOG", "info"), ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4317")];
    let (action, pid1, _) = local.ensure(&a);
    assert_eq!(action, "started");
    local.wait_started(1).await;

    // Nothing changed: left running.
    let (action, pid, said) = local.ensure(&a);
    assert_eq!((action.as_str(), pid), ("running", pid1), "{said}");
    assert!(!said.contains("restarting"), "{said}");

    // RUST_LOG changed: restarted, and up.sh names it; the new process has it.
    let b = [("RUST_LOG", "debug"), ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4317")];
    let (action, pid2, said) = local.ensure(&b);
    assert_eq!(action, "restarted");
    assert!(said.contains("restarting fake (environment changed: RUST_LOG)"), "{said}");
    assert_ne!(pid2, pid1);
    assert!(!alive(pid1), "the old process was stopped");
    let log = local.wait_started(2).await;
    assert!(log[1].contains("RUST_LOG=debug"), "{log:?}");

    // The endpoint and the exporter: both named.
    let c = [
        ("RUST_LOG", "debug"),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://10.0.0.9:4317"),
        ("OTEL_TRACES_EXPORTER", "console"),
    ];
    let (action, pid3, said) = local.ensure(&c);
    assert_eq!(action, "restarted");
    assert!(
        said.contains("(environment changed: OTEL_EXPORTER_OTLP_ENDPOINT, OTEL_TRACES_EXPORTER)"),
        "{said}"
    );
    let log = local.wait_started(3).await;
    assert!(log[2].contains("endpoint=http://10.0.0.9:4317 exporter=console"), "{log:?}");

    // A changed secret is named, never shown; the record is private.
    let mut d = c.to_vec();
    d.push(("MESH_DATABASE_WRITE_URL", "postgres://mesh:hunter2@127.0.0.1:1/mesh"));
    let (_, pid4, said) = local.ensure(&d);
    assert!(
        said.contains("environment changed: MESH_DATABASE_WRITE_URL)") && !said.contains("hunter2"),
        "{said}"
    );
    let record = local.dir.path().join("run/fake.env");
    assert_eq!(std::fs::metadata(&record).unwrap().permissions().mode() & 0o077, 0);
    local.wait_started(4).await;

    // A rebuilt binary.
    local.run(&[], r#"touch -d "@$(( $(date +%s) + 5 ))" "$FAKE""#);
    let (action, pid5, said) = local.ensure(&d);
    assert_eq!(action, "restarted");
    assert!(said.contains("restarting fake (rebuilt)"), "{said}");
    assert!(![pid1, pid2, pid3, pid4].contains(&pid5));
    local.wait_started(5).await;
}

#[test]
fn the_banner_says_where_traces_go_from_the_environment_services_got() {
    let local = Local::new();
    let banner = |env: &[(&str, &str)]| local.run(env, "traces_banner").stdout.trim().to_owned();
    let sink = banner(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4317")]);
    assert!(
        sink.starts_with("OTLP to the local sink http://127.0.0.1:4317")
            && sink.contains("mesh-trace --last"),
        "{sink}"
    );
    assert_eq!(
        banner(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://jaeger:4317")]),
        "OTLP to http://jaeger:4317"
    );
    assert_eq!(
        banner(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://a:1"),
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://b:2")
        ]),
        "OTLP to http://b:2"
    );
    let none =
        banner(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4317"), ("OTEL_TRACES_EXPORTER", "none")]);
    assert_eq!(none, "not exported (OTEL_TRACES_EXPORTER=none)");
    assert!(banner(&[("OTEL_TRACES_EXPORTER", "console")]).starts_with("printed to each service's log"));
}

#[test]
fn the_env_file_puts_mesh_audit_on_path_with_its_database_url() {
    let local = Local::new();
    let bin = local.dir.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    let audit = bin.join("mesh-audit");
    std::fs::write(&audit, "#!/bin/sh\necho \"mesh-audit $1 against $MESH_DATABASE_WRITE_URL\"\n").unwrap();
    std::fs::set_permissions(&audit, std::fs::Permissions::from_mode(0o755)).unwrap();
    let file = local.run(&[], &format!("local_env_file {}", bin.display())).stdout.trim().to_owned();
    assert!(Path::new(&file).starts_with(local.dir.path()), "{file}");
    // A fresh shell that only sources the file.
    let out = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "source {file} && mesh-audit verify && echo \"trace file $MESH_TRACE_FILE\" && echo \"grpcurl $MESH_LOCAL_GRPCURL\""
        ))
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&out.stdout);
    assert!(out.contains("mesh-audit verify against postgres://mesh:mesh@127.0.0.1:55432/mesh"), "{out}");
    assert!(
        out.contains(&format!("trace file {}", local.dir.path().join("run/traces.jsonl").display())),
        "{out}"
    );
    // Without TLS, grpcurl speaks plaintext to the stack.
    assert!(out.contains("grpcurl -plaintext\n"), "{out}");
}

/// The DER of the first certificate in the PEM file at `path` (openssl).
fn der(path: &Path) -> Vec<u8> {
    let out = Command::new("openssl").args(["x509", "-outform", "der", "-in"]).arg(path).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    out.stdout
}

#[test]
fn the_local_pki_makes_certificates_the_mesh_loads_with_their_identities_once() {
    use mesh_runtime::tls::{TlsConfig, identity_of, keys};
    let local = Local::new();
    let tls = local.dir.path().join("tls");
    let make = || local.run(&[], &format!("tls_local_pki {} data ops", tls.display())).stderr;
    assert!(make().contains("making a local CA"));
    let p = |name: &str| tls.join(name).to_string_lossy().into_owned();
    for name in ["data", "ops"] {
        // What a service reads: the pair matches, the CA bundle verifies callers.
        let env: std::collections::HashMap<&'static str, String> = [
            (keys::CERT_FILE, p(&format!("{name}.pem"))),
            (keys::KEY_FILE, p(&format!("{name}-key.pem"))),
            (keys::CA_FILE, p("ca.pem")),
        ]
        .into();
        TlsConfig::from_lookup(&env).unwrap().expect("tls on");
        let id = identity_of(&der(&tls.join(format!("{name}.pem")))).expect("a spiffe identity");
        assert_eq!(id.as_str(), format!("spiffe://mesh.local/ns/default/sa/{name}"));
        let mode = std::fs::metadata(tls.join(format!("{name}-key.pem"))).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "{name}'s key is readable by others: {mode:o}");
    }
    // A rerun changes nothing (running services keep their certificates)…
    let before = std::fs::read(tls.join("data.pem")).unwrap();
    assert!(!make().contains("making a local CA"));
    assert_eq!(std::fs::read(tls.join("data.pem")).unwrap(), before);
    // …but a leaf the CA did not sign (here: the CA was replaced) is issued again.
    std::fs::remove_file(tls.join("ca-key.pem")).unwrap();
    assert!(make().contains("making a local CA"));
    assert_ne!(std::fs::read(tls.join("data.pem")).unwrap(), before);
    let out = Command::new("openssl")
        .args(["verify", "-CAfile"])
        .args([tls.join("ca.pem"), tls.join("data.pem")])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    // The env file gives grpcurl the CA and the ops identity.
    let file = local.run(&[], &format!("local_env_file /nonexistent {}", tls.display())).stdout;
    let env = std::fs::read_to_string(file.trim()).unwrap();
    let flags = format!("-cacert {} -cert {} -key {}", p("ca.pem"), p("ops.pem"), p("ops-key.pem"));
    assert!(env.contains(&format!("export MESH_LOCAL_GRPCURL=\"{flags}\"")), "{env}");
}
