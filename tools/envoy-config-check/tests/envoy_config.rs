//! deploy/envoy's configurations, loaded into Envoy's bootstrap proto (as
//! Envoy parses them: unknown fields and wrong types fail) and checked
//! against mesh: the filters' clusters reach mesh's ports, the filters run
//! in the order the identity headers need, and every rate-limit descriptor
//! Envoy sends has a rule in the `api` domain.

use std::collections::BTreeSet;

use anyhow::{Context, Result, bail, ensure};
use mesh_envoy_config_check::{compile_protos, load_bootstrap, repo_root};
use prost_reflect::DescriptorPool;
use serde_json::Value;

/// The configurations, and where each one's mesh clusters must point.
const CONFIGS: &[Config] = &[
    Config {
        path: "deploy/envoy/envoy.yaml",
        session_host: "127.0.0.1",
        ratelimit_host: "127.0.0.1",
        app_host: "127.0.0.1",
    },
    Config {
        path: "deploy/k8s/envoy-gateway/envoy.yaml",
        session_host: "mesh-session-headless",
        ratelimit_host: "mesh-ratelimit-headless",
        app_host: "app",
    },
    Config {
        path: "deploy/envoy/compose/envoy.yaml",
        session_host: "session",
        ratelimit_host: "ratelimit",
        app_host: "app",
    },
];

struct Config {
    path: &'static str,
    session_host: &'static str,
    ratelimit_host: &'static str,
    /// Where the example upstream (cluster `app`) is.
    app_host: &'static str,
}

fn read(path: &str) -> Result<String> {
    std::fs::read_to_string(repo_root().join(path)).with_context(|| path.to_owned())
}

fn pool() -> DescriptorPool {
    compile_protos().expect("vendored protos compile")
}

/// Loads one configuration; its canonical JSON (proto field names).
fn load(pool: &DescriptorPool, path: &str) -> Value {
    let yaml = read(path).unwrap();
    match load_bootstrap(pool, &yaml) {
        Ok((_, json)) => json,
        Err(e) => panic!("{path}: {e:#}"),
    }
}

/// `pub const DEFAULT_PORT: u16 = N;` from a service's config source, read
/// as text so this crate does not build the services.
fn default_port(service: &str) -> u16 {
    let path = format!("services/{service}/src/config.rs");
    let src = read(&path).unwrap();
    let line = src.lines().find(|l| l.starts_with("pub const DEFAULT_PORT: u16 = ")).expect(&path);
    line.trim_start_matches("pub const DEFAULT_PORT: u16 = ").trim_end_matches(';').parse().expect(&path)
}

/// The `grpc` port of a Service in deploy/k8s/base/<file>.
fn k8s_service_port(file: &str, service: &str) -> u16 {
    let text = read(&format!("deploy/k8s/base/{file}")).unwrap();
    for doc in serde_yaml_ng::Deserializer::from_str(&text) {
        let doc: Value = serde::Deserialize::deserialize(doc).unwrap();
        if doc["kind"] == "Service" && doc["metadata"]["name"] == service {
            let ports = doc["spec"]["ports"].as_array().unwrap();
            let grpc = ports.iter().find(|p| p["name"] == "grpc").expect("grpc port");
            return u16::try_from(grpc["port"].as_u64().unwrap()).unwrap();
        }
    }
    panic!("no Service {service} in deploy/k8s/base/{file}")
}

fn hcm(bootstrap: &Value) -> &Value {
    let listeners = bootstrap["static_resources"]["listeners"].as_array().unwrap();
    assert_eq!(listeners.len(), 1);
    let filter = &listeners[0]["filter_chains"][0]["filters"][0];
    assert_eq!(filter["name"], "envoy.filters.network.http_connection_manager");
    &filter["typed_config"]
}

fn http_filter<'a>(bootstrap: &'a Value, name: &str) -> &'a Value {
    let filters = hcm(bootstrap)["http_filters"].as_array().unwrap();
    &filters.iter().find(|f| f["name"] == name).unwrap_or_else(|| panic!("no {name}"))["typed_config"]
}

fn cluster<'a>(bootstrap: &'a Value, name: &str) -> &'a Value {
    let clusters = bootstrap["static_resources"]["clusters"].as_array().unwrap();
    clusters.iter().find(|c| c["name"] == name).unwrap_or_else(|| panic!("no cluster {name}"))
}

/// The single (host, port) a static cluster points at.
fn endpoint(cluster: &Value) -> (String, u16) {
    let eps = &cluster["load_assignment"]["endpoints"];
    assert_eq!(eps.as_array().unwrap().len(), 1);
    let lb = eps[0]["lb_endpoints"].as_array().unwrap();
    assert_eq!(lb.len(), 1);
    let sa = &lb[0]["endpoint"]["address"]["socket_address"];
    (sa["address"].as_str().unwrap().to_owned(), u16::try_from(sa["port_value"].as_u64().unwrap()).unwrap())
}

/// `copy` with its three upstream addresses (session, ratelimit, app, each
/// of which must occur exactly once) put back to `base`'s: equal to `base`'s
/// text when the copy differs from it in those addresses only.
fn with_addresses_of(base: &Config, copy: &Config) -> Result<String> {
    let mut back = read(copy.path)?;
    for (port, name, to) in [
        (50051, copy.session_host, base.session_host),
        (50052, copy.ratelimit_host, base.ratelimit_host),
        (8081, copy.app_host, base.app_host),
    ] {
        let from = format!("socket_address: {{ address: {name}, port_value: {port} }}");
        let to = format!("socket_address: {{ address: {to}, port_value: {port} }}");
        ensure!(back.matches(&from).count() == 1, "{}: {from} must occur once", copy.path);
        back = back.replace(&from, &to);
    }
    Ok(back)
}

#[test]
fn k8s_envoy_yaml_is_envoy_yaml_with_service_names() {
    let local = read(CONFIGS[0].path).unwrap();
    let back = with_addresses_of(&CONFIGS[0], &CONFIGS[1]).unwrap();
    assert!(
        back == local,
        "deploy/k8s/envoy-gateway/envoy.yaml differs from deploy/envoy/envoy.yaml beyond the addresses"
    );
}

#[test]
fn compose_envoy_yaml_is_envoy_yaml_with_compose_service_names() {
    let local = read(CONFIGS[0].path).unwrap();
    let back = with_addresses_of(&CONFIGS[0], &CONFIGS[2]).unwrap();
    assert!(
        back == local,
        "deploy/envoy/compose/envoy.yaml differs from deploy/envoy/envoy.yaml beyond the addresses"
    );
}

/// The compose copy is what docker-compose.yml's `envoy` service mounts and
/// runs, and its addresses are services of that file listening on the
/// ports the clusters name.
#[test]
fn compose_runs_the_compose_envoy_yaml_against_its_services() {
    let compose: Value = serde_yaml_ng::from_str(&read("docker-compose.yml").unwrap()).unwrap();
    let services = &compose["services"];
    let envoy = &services["envoy"];
    let mounted = envoy["volumes"]
        .as_array()
        .expect("envoy: volumes")
        .iter()
        .filter_map(Value::as_str)
        .find_map(|v| v.strip_suffix(":ro")?.split_once(':'))
        .expect("envoy: a read-only bind mount");
    assert_eq!(
        mounted,
        ("./deploy/envoy/compose", "/etc/envoy"),
        "envoy mounts the compose copy's directory"
    );
    let args: Vec<&str> =
        envoy["command"].as_array().expect("envoy: command").iter().filter_map(Value::as_str).collect();
    let config = args.iter().position(|a| *a == "--config-path").map(|i| args[i + 1]);
    assert_eq!(config, Some("/etc/envoy/envoy.yaml"), "envoy: {args:?}");
    let c = &CONFIGS[2];
    for (host, port) in [
        (c.session_host, default_port("session")),
        (c.ratelimit_host, default_port("ratelimit")),
        (c.app_host, 8081),
    ] {
        let svc = &services[host];
        assert!(svc.is_object(), "{}: no compose service {host}", c.path);
        let env = &svc["environment"];
        let listens = env["MESH_LISTEN_ADDR"]
            .as_str()
            .map(|a| a.ends_with(&format!(":{port}")))
            .or_else(|| env["PORT"].as_str().map(|p| p == port.to_string()));
        assert_eq!(listens, Some(true), "compose service {host} does not listen on {port}");
    }
    let depends = &envoy["depends_on"];
    for dep in [c.session_host, c.ratelimit_host] {
        assert_eq!(depends[dep]["condition"], "service_healthy", "envoy must wait for {dep}'s readiness");
    }
}

#[test]
fn envoy_configs_load_into_the_bootstrap_proto() {
    let pool = pool();
    for c in CONFIGS {
        let b = load(&pool, c.path);
        let listener = &b["static_resources"]["listeners"][0]["address"]["socket_address"];
        assert_eq!(listener["port_value"], 8080, "{}", c.path);
    }
}

/// A mutation: replace `from` (which must occur exactly once) with `to`.
struct Mutation {
    what: &'static str,
    from: &'static str,
    to: &'static str,
    /// What the error must say (so it fails for this reason, not another).
    error: &'static str,
}

const MUTATIONS: &[Mutation] = &[
    Mutation {
        what: "misspelled field",
        from: "failure_mode_allow: false",
        to: "failure_mode_alow: false",
        error: "unrecognized field name 'failure_mode_alow'",
    },
    Mutation {
        what: "misspelled field inside an Any",
        from: "enable_x_ratelimit_headers: DRAFT_VERSION_03",
        to: "enable_x_rate_limit_headers: DRAFT_VERSION_03",
        error: "unrecognized field name 'enable_x_rate_limit_headers'",
    },
    Mutation {
        what: "string where a number goes",
        from: "port_value: 50051",
        to: "port_value: fifty",
        error: "invalid digit",
    },
    Mutation {
        what: "number where a string goes",
        from: "domain: api",
        to: "domain: 42",
        error: "expected a string",
    },
    Mutation {
        what: "unknown enum value",
        from: "transport_api_version: V3\n                      grpc_service:",
        to: "transport_api_version: V4\n                      grpc_service:",
        error: "unrecognized enum value 'V4'",
    },
    Mutation {
        what: "duration without a unit",
        from: "timeout: 0.25s",
        to: "timeout: 0.25",
        error: "expected a duration string",
    },
    Mutation {
        what: "unknown @type",
        from: "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router",
        to: "type.googleapis.com/envoy.extensions.filters.http.router.v3.Routr",
        error: "'envoy.extensions.filters.http.router.v3.Routr' not found",
    },
    Mutation {
        what: "message where a list goes",
        from: "domains: [\"*\"]",
        to: "domains: { any: true }",
        error: "expected a list",
    },
];

#[test]
fn envoy_config_with_unknown_field_or_wrong_type_is_rejected() {
    let pool = pool();
    for c in CONFIGS {
        let yaml = read(c.path).unwrap();
        load_bootstrap(&pool, &yaml)
            .unwrap_or_else(|e| panic!("{}: the unmutated file fails: {e:#}", c.path));
        for m in MUTATIONS {
            assert_eq!(yaml.matches(m.from).count(), 1, "{}: {:?} must occur once", c.path, m.from);
            let mutated = yaml.replacen(m.from, m.to, 1);
            match load_bootstrap(&pool, &mutated) {
                Ok(_) => panic!("{}: {} ({:?}) was accepted", c.path, m.what, m.to),
                Err(e) => {
                    let e = format!("{e:#}");
                    assert!(e.contains(m.error), "{}: {} rejected for another reason: {e}", c.path, m.what);
                }
            }
        }
    }
}

#[test]
fn filters_run_ext_authz_then_ratelimit_then_router() {
    let pool = pool();
    for c in CONFIGS {
        let b = load(&pool, c.path);
        let names: Vec<&str> =
            hcm(&b)["http_filters"].as_array().unwrap().iter().map(|f| f["name"].as_str().unwrap()).collect();
        assert_eq!(
            names,
            ["envoy.filters.http.ext_authz", "envoy.filters.http.ratelimit", "envoy.filters.http.router"],
            "{}",
            c.path
        );
    }
}

#[test]
fn filter_clusters_reach_mesh_session_and_ratelimit_ports() {
    let pool = pool();
    let session_port = default_port("session");
    let ratelimit_port = default_port("ratelimit");
    // The k8s Services must serve the same ports (the Envoy config names them).
    assert_eq!(k8s_service_port("session.yaml", "mesh-session-headless"), session_port);
    assert_eq!(k8s_service_port("ratelimit.yaml", "mesh-ratelimit-headless"), ratelimit_port);
    for c in CONFIGS {
        let b = load(&pool, c.path);
        let authz = http_filter(&b, "envoy.filters.http.ext_authz");
        assert_eq!(authz["transport_api_version"], "V3", "{}", c.path);
        // Fail closed: absent (false) is the default, so read it explicitly.
        assert!(authz.get("failure_mode_allow").is_none_or(|v| v == false), "{}", c.path);
        assert_eq!(authz["status_on_error"]["code"], "ServiceUnavailable", "{}", c.path);
        assert!(authz.get("with_request_body").is_none(), "{}", c.path);
        let authz_cluster = authz["grpc_service"]["envoy_grpc"]["cluster_name"].as_str().unwrap();

        let rl = http_filter(&b, "envoy.filters.http.ratelimit");
        assert_eq!(rl["domain"], "api", "{}", c.path);
        assert_eq!(rl["rate_limit_service"]["transport_api_version"], "V3", "{}", c.path);
        assert_eq!(rl["enable_x_ratelimit_headers"], "DRAFT_VERSION_03", "{}", c.path);
        let rl_cluster =
            rl["rate_limit_service"]["grpc_service"]["envoy_grpc"]["cluster_name"].as_str().unwrap();

        for (name, host, port) in
            [(authz_cluster, c.session_host, session_port), (rl_cluster, c.ratelimit_host, ratelimit_port)]
        {
            let cl = cluster(&b, name);
            assert_eq!(endpoint(cl), (host.to_owned(), port), "{}: cluster {name}", c.path);
            // gRPC needs HTTP/2 upstream, and a health check on mesh's readiness name.
            let opts = &cl["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"];
            assert!(
                opts["explicit_http_config"].get("http2_protocol_options").is_some(),
                "{}: {name}",
                c.path
            );
            assert_eq!(
                cl["health_checks"][0]["grpc_health_check"]["service_name"], "readiness",
                "{}",
                c.path
            );
            assert!(cl["circuit_breakers"]["thresholds"].as_array().is_some_and(|t| !t.is_empty()));
        }
    }
}

#[test]
fn identity_headers_come_from_ext_authz_only() {
    let authz_src = read("services/session/src/authz.rs").unwrap();
    let pool = pool();
    for c in CONFIGS {
        let b = load(&pool, c.path);
        let vhosts = hcm(&b)["route_config"]["virtual_hosts"].as_array().unwrap();
        for route in vhosts.iter().flat_map(|v| v["routes"].as_array().unwrap()) {
            let per = &route["typed_per_filter_config"]["envoy.filters.http.ext_authz"];
            // Where ext_authz does not run, nothing overwrites a client's
            // copies of the identity headers: the route must strip them.
            if per["disabled"] == true {
                let removed: BTreeSet<&str> = route["request_headers_to_remove"]
                    .as_array()
                    .map(|a| a.iter().map(|h| h.as_str().unwrap()).collect())
                    .unwrap_or_default();
                for h in ["x-mesh-user-id", "x-mesh-session-id"] {
                    assert!(removed.contains(h), "{}: {} keeps a forged {h}", c.path, route["match"]);
                }
                assert!(
                    route["route"].get("rate_limits").is_none(),
                    "{}: unauthenticated route limited by user",
                    c.path
                );
            }
            for rl in route["route"]["rate_limits"].as_array().into_iter().flatten() {
                for a in rl["actions"].as_array().unwrap() {
                    if let Some(h) = a.get("request_headers") {
                        let name = h["header_name"].as_str().unwrap();
                        // The header is the one mesh-session sets on allow.
                        assert!(
                            authz_src.contains(&format!("user_header: \"{name}\"")),
                            "{}: descriptor header {name} is not mesh-session's user header",
                            c.path
                        );
                    }
                }
            }
        }
    }
}

/// One entry of a descriptor Envoy sends: the key, and the value when it is
/// fixed in the config (`generic_key`), `None` when it comes from the request.
type Entry = (String, Option<String>);

fn descriptor(actions: &Value) -> Result<Vec<Entry>> {
    actions
        .as_array()
        .context("actions")?
        .iter()
        .map(|a| {
            if let Some(g) = a.get("generic_key") {
                let key = g["descriptor_key"].as_str().unwrap_or("generic_key");
                Ok((key.to_owned(), Some(g["descriptor_value"].as_str().context("value")?.to_owned())))
            } else if let Some(h) = a.get("request_headers") {
                Ok((h["descriptor_key"].as_str().context("key")?.to_owned(), None))
            } else if a.get("remote_address").is_some() {
                Ok(("remote_address".to_owned(), None))
            } else {
                bail!("action {a} is not checked here")
            }
        })
        .collect()
}

/// Whether the descriptor reaches a node with a `rate_limit` in the rules
/// tree (mesh's matching: a rule with a value matches that value, one
/// without matches every value).
fn limited(nodes: &Value, d: &[Entry]) -> bool {
    let Some(((key, value), rest)) = d.split_first() else { return false };
    nodes.as_array().into_iter().flatten().any(|n| {
        let key_ok = n["key"] == key.as_str();
        let value_ok = match (n.get("value").and_then(Value::as_str), value) {
            (None, _) => true,
            (Some(rule), Some(v)) => rule == v,
            (Some(_), None) => false, // a request value cannot be relied on to match
        };
        key_ok
            && value_ok
            && if rest.is_empty() { n.get("rate_limit").is_some() } else { limited(&n["descriptors"], rest) }
    })
}

fn rules_keys(nodes: &Value, out: &mut BTreeSet<String>) {
    for n in nodes.as_array().into_iter().flatten() {
        out.insert(n["key"].as_str().unwrap().to_owned());
        rules_keys(&n["descriptors"], out);
    }
}

#[test]
fn descriptor_keys_match_the_api_domain_rules() -> Result<()> {
    let text = read("deploy/k8s/base/ratelimit-rules/rules.yaml")?;
    let mut api = None;
    for doc in serde_yaml_ng::Deserializer::from_str(&text) {
        let doc: Value = serde::Deserialize::deserialize(doc)?;
        if doc["domain"] == "api" {
            api = Some(doc);
        }
    }
    let api = api.context("no `api` domain in rules.yaml")?;
    let mut keys = BTreeSet::new();
    rules_keys(&api["descriptors"], &mut keys);

    let pool = pool();
    for c in CONFIGS {
        let b = load(&pool, c.path);
        let mut sent = 0;
        let vhosts = hcm(&b)["route_config"]["virtual_hosts"].as_array().unwrap();
        for route in vhosts.iter().flat_map(|v| v["routes"].as_array().unwrap()) {
            for rl in route["route"]["rate_limits"].as_array().into_iter().flatten() {
                let d = descriptor(&rl["actions"])?;
                sent += 1;
                for (k, _) in &d {
                    ensure!(keys.contains(k), "{}: descriptor key {k} is not in the api domain", c.path);
                }
                ensure!(
                    limited(&api["descriptors"], &d),
                    "{}: {d:?} ({}) matches no api rule",
                    c.path,
                    route["match"]
                );
            }
        }
        ensure!(sent > 0, "{}: no rate_limits at all", c.path);
    }
    Ok(())
}
