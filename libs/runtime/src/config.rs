//! Configuration from the environment, behind a lookup tests can fake.

use std::{
    collections::{BTreeSet, HashMap},
    fmt::Display,
    net::SocketAddr,
    process::ExitCode,
    str::FromStr,
    time::Duration,
};

use secrecy::SecretString;

/// Where configuration values come from: the process environment in
/// production, a map in tests.
pub trait Lookup {
    /// The value of `key`, if set.
    fn get(&self, key: &str) -> Option<String>;
}

/// The process environment.
#[derive(Debug, Clone, Copy, Default)]
pub struct Env;

impl Lookup for Env {
    fn get(&self, key: &str) -> Option<String> {
        std::env::var(key).ok()
    }
}

impl<S: std::hash::BuildHasher> Lookup for HashMap<String, String, S> {
    fn get(&self, key: &str) -> Option<String> {
        HashMap::get(self, key).cloned()
    }
}

impl<S: std::hash::BuildHasher> Lookup for HashMap<&'static str, String, S> {
    fn get(&self, key: &str) -> Option<String> {
        HashMap::get(self, key).cloned()
    }
}

/// A configuration value that is missing or cannot be parsed. The message
/// names the key and never carries the value when the key holds a secret.
#[derive(Debug, thiserror::Error)]
#[error("{key}: {reason}")]
pub struct ConfigError {
    /// The environment variable.
    pub key: &'static str,
    /// What is wrong with it.
    pub reason: String,
}

impl ConfigError {
    /// A new error for `key`.
    pub fn new(key: &'static str, reason: impl Into<String>) -> Self {
        Self { key, reason: reason.into() }
    }
}

/// Typed reads over a [`Lookup`]. Empty values count as unset.
pub trait LookupExt: Lookup {
    /// A non-empty string.
    fn string(&self, key: &'static str) -> Option<String> {
        self.get(key).map(|v| v.trim().to_owned()).filter(|v| !v.is_empty())
    }

    /// A required non-empty string.
    fn required(&self, key: &'static str) -> Result<String, ConfigError> {
        self.string(key).ok_or_else(|| ConfigError::new(key, "is required"))
    }

    /// A secret (a URL with a password, a token); its value never appears in errors.
    fn secret(&self, key: &'static str) -> Option<SecretString> {
        self.string(key).map(SecretString::from)
    }

    /// A value parsed with `FromStr`, or `default` when unset.
    fn parse_or<T>(&self, key: &'static str, default: T) -> Result<T, ConfigError>
    where
        T: FromStr,
        T::Err: Display,
    {
        match self.string(key) {
            None => Ok(default),
            Some(v) => v.parse().map_err(|e| ConfigError::new(key, format!("cannot parse {v:?}: {e}"))),
        }
    }

    /// A socket address, or `default` when unset.
    fn addr_or(&self, key: &'static str, default: &str) -> Result<SocketAddr, ConfigError> {
        let v = self.string(key).unwrap_or_else(|| default.to_owned());
        v.parse().map_err(|e| ConfigError::new(key, format!("cannot parse {v:?} as host:port: {e}")))
    }

    /// A duration in milliseconds, or `default` when unset.
    fn millis_or(&self, key: &'static str, default: Duration) -> Result<Duration, ConfigError> {
        match self.string(key) {
            None => Ok(default),
            Some(v) => v
                .parse::<u64>()
                .map(Duration::from_millis)
                .map_err(|e| ConfigError::new(key, format!("expected milliseconds, got {v:?}: {e}"))),
        }
    }

    /// A comma-separated list with empty items dropped.
    fn list(&self, key: &'static str) -> Vec<String> {
        self.string(key).map(|v| split_list(&v)).unwrap_or_default()
    }

    /// A comma-separated list of secrets (e.g. database URLs with passwords).
    fn secret_list(&self, key: &'static str) -> Vec<SecretString> {
        self.list(key).into_iter().map(SecretString::from).collect()
    }
}

impl<L: Lookup + ?Sized> LookupExt for L {}

/// Splits a comma-separated list, trimming items and dropping empty ones.
pub fn split_list(v: &str) -> Vec<String> {
    v.split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::to_owned).collect()
}

/// Keys read by [`ServerConfig::from_lookup`].
pub mod keys {
    /// gRPC listen address.
    pub const LISTEN_ADDR: &str = "MESH_LISTEN_ADDR";
    /// Prometheus `/metrics` listen address.
    pub const METRICS_ADDR: &str = "MESH_METRICS_ADDR";
    /// How long in-flight calls get to finish after SIGTERM (ms).
    pub const SHUTDOWN_GRACE_MS: &str = "MESH_SHUTDOWN_GRACE_MS";
    /// How long to keep serving, NOT_SERVING, before closing listeners (ms),
    /// so load balancers see readiness drop before connections are refused.
    pub const DRAIN_DELAY_MS: &str = "MESH_DRAIN_DELAY_MS";
    /// How often dependencies are checked for readiness (ms).
    pub const HEALTH_INTERVAL_MS: &str = "MESH_HEALTH_INTERVAL_MS";
    /// How long one dependency check may take (ms).
    pub const HEALTH_TIMEOUT_MS: &str = "MESH_HEALTH_TIMEOUT_MS";
    /// Consecutive failed checks before readiness drops.
    pub const HEALTH_FAILURE_THRESHOLD: &str = "MESH_HEALTH_FAILURE_THRESHOLD";
    /// Calls handled at once before the rest queue (see `admission`).
    pub const MAX_IN_FLIGHT: &str = "MESH_MAX_IN_FLIGHT";
    /// Longest a call queues for a slot before it is shed (ms).
    pub const QUEUE_WAIT_MS: &str = "MESH_QUEUE_WAIT_MS";
    /// Largest request or response message (bytes).
    pub const MAX_MESSAGE_BYTES: &str = "MESH_MAX_MESSAGE_BYTES";
    /// HTTP/2 streams one connection may have open at once.
    pub const MAX_CONCURRENT_STREAMS: &str = "MESH_MAX_CONCURRENT_STREAMS";
    /// Client connections open at once.
    pub const MAX_CONNECTIONS: &str = "MESH_MAX_CONNECTIONS";
    /// `true`: refuse to start without TLS configured.
    pub const REQUIRE_TLS: &str = "MESH_REQUIRE_TLS";
    /// Plaintext health-only listener, when TLS is on.
    pub const HEALTH_LISTEN_ADDR: &str = "MESH_HEALTH_LISTEN_ADDR";
}

/// What every server needs: where to listen and how to drain.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// gRPC listen address (`MESH_LISTEN_ADDR`).
    pub listen_addr: SocketAddr,
    /// Metrics listen address (`MESH_METRICS_ADDR`).
    pub metrics_addr: SocketAddr,
    /// Grace period for in-flight calls after shutdown starts.
    pub shutdown_grace: Duration,
    /// Delay between readiness going NOT_SERVING and the listeners closing.
    pub drain_delay: Duration,
    /// Readiness check period.
    pub health_interval: Duration,
    /// Timeout of one dependency check.
    pub health_timeout: Duration,
    /// Consecutive failures before a dependency counts as down.
    pub health_failure_threshold: u32,
    /// Admission limits (`MESH_MAX_IN_FLIGHT`, …; see [`crate::admission`]).
    pub limits: crate::admission::Limits,
    /// Who may call admin RPCs (`MESH_ADMIN_IDENTITIES`, see [`crate::authz`]).
    pub admin_identities: crate::authz::AdminIdentities,
    /// Mutual TLS on the gRPC listener (`MESH_TLS_*`, see [`crate::tls`]);
    /// `None`: plaintext.
    pub tls: Option<crate::tls::TlsConfig>,
    /// With TLS: the plaintext listener serving only `grpc.health.v1.Health`
    /// (`MESH_HEALTH_LISTEN_ADDR`), for probes that cannot speak TLS.
    /// Unused without TLS (health is then on the gRPC listener).
    pub health_listen_addr: Option<SocketAddr>,
}

/// Defaults of [`ServerConfig::from_lookup`], shown by `--help`.
mod defaults {
    use std::time::Duration;

    pub(super) const SHUTDOWN_GRACE: Duration = Duration::from_secs(20);
    pub(super) const DRAIN_DELAY: Duration = Duration::ZERO;
    pub(super) const HEALTH_INTERVAL: Duration = Duration::from_millis(1000);
    pub(super) const HEALTH_TIMEOUT: Duration = Duration::from_millis(800);
    pub(super) const HEALTH_FAILURE_THRESHOLD: u32 = 2;
}

/// How far above the gRPC port the metrics port is when
/// `MESH_METRICS_ADDR` is unset.
pub const METRICS_PORT_OFFSET: u16 = 1000;

/// How far above the gRPC port the plaintext health port is when TLS is
/// on and `MESH_HEALTH_LISTEN_ADDR` is unset.
pub const HEALTH_PORT_OFFSET: u16 = 2000;

impl ServerConfig {
    /// Reads the server settings. `default_port` is the service's gRPC port
    /// when `MESH_LISTEN_ADDR` is unset; the metrics listener defaults to
    /// the gRPC listener's host and port + [`METRICS_PORT_OFFSET`] (port 0
    /// stays 0: any free port), so instances on different gRPC ports never
    /// collide on metrics. A gRPC port above 64535 needs `MESH_METRICS_ADDR`.
    pub fn from_lookup(l: &impl Lookup, default_port: u16) -> Result<Self, ConfigError> {
        Self::from_lookup_with(l, default_port, crate::admission::Limits::default())
    }

    /// As [`Self::from_lookup`], with a service's own default admission
    /// limits (its `vars()` then shows them with [`VarGroup::with_default`]).
    pub fn from_lookup_with(
        l: &impl Lookup,
        default_port: u16,
        limits: crate::admission::Limits,
    ) -> Result<Self, ConfigError> {
        let listen_addr = l.addr_or(keys::LISTEN_ADDR, &default_listen_addr(default_port))?;
        let metrics_addr = match l.string(keys::METRICS_ADDR) {
            // Set: parsed as given (the empty default is never used).
            Some(_) => l.addr_or(keys::METRICS_ADDR, "")?,
            None => metrics_addr_for(listen_addr)?,
        };
        let tls = crate::tls::TlsConfig::from_lookup(l)?;
        if l.parse_or(keys::REQUIRE_TLS, false)? && tls.is_none() {
            return Err(ConfigError::new(
                keys::REQUIRE_TLS,
                format!(
                    "is true but TLS is not configured: set {} and {} (and {})",
                    crate::tls::keys::CERT_FILE,
                    crate::tls::keys::KEY_FILE,
                    crate::tls::keys::CA_FILE
                ),
            ));
        }
        Ok(Self {
            listen_addr,
            metrics_addr,
            shutdown_grace: l.millis_or(keys::SHUTDOWN_GRACE_MS, defaults::SHUTDOWN_GRACE)?,
            drain_delay: l.millis_or(keys::DRAIN_DELAY_MS, defaults::DRAIN_DELAY)?,
            health_interval: l.millis_or(keys::HEALTH_INTERVAL_MS, defaults::HEALTH_INTERVAL)?,
            health_timeout: l.millis_or(keys::HEALTH_TIMEOUT_MS, defaults::HEALTH_TIMEOUT)?,
            health_failure_threshold: l
                .parse_or(keys::HEALTH_FAILURE_THRESHOLD, defaults::HEALTH_FAILURE_THRESHOLD)?
                .max(1),
            limits: crate::admission::Limits::from_lookup(l, limits)?,
            admin_identities: crate::authz::AdminIdentities::from_lookup(l)?,
            health_listen_addr: health_addr_for(l, listen_addr, tls.is_some())?,
            tls,
        })
    }

    /// The variables [`Self::from_lookup`] reads, for `--help`.
    pub fn vars(default_port: u16) -> VarGroup {
        use keys::*;
        VarGroup::new(
            "Server",
            vec![
                Var::value(LISTEN_ADDR, default_listen_addr(default_port), "gRPC listen address (host:port)"),
                Var::unset(
                    METRICS_ADDR,
                    format!("the gRPC listen host, gRPC port + {METRICS_PORT_OFFSET}"),
                    "Prometheus /metrics listen address (host:port)",
                ),
                Var::millis(
                    SHUTDOWN_GRACE_MS,
                    defaults::SHUTDOWN_GRACE,
                    "how long in-flight calls get to finish after SIGTERM (ms)",
                ),
                Var::millis(
                    DRAIN_DELAY_MS,
                    defaults::DRAIN_DELAY,
                    "how long the server keeps answering, readiness NOT_SERVING, after SIGTERM before \
                     it closes its listeners (ms), so load balancers see readiness drop first",
                ),
                Var::millis(
                    HEALTH_INTERVAL_MS,
                    defaults::HEALTH_INTERVAL,
                    "how often dependencies are checked for readiness (ms)",
                ),
                Var::millis(
                    HEALTH_TIMEOUT_MS,
                    defaults::HEALTH_TIMEOUT,
                    "how long one dependency check may take (ms)",
                ),
                Var::value(
                    HEALTH_FAILURE_THRESHOLD,
                    defaults::HEALTH_FAILURE_THRESHOLD,
                    "consecutive failed checks before a dependency counts as down (at least 1)",
                ),
                crate::admission::Limits::var_max_in_flight(&crate::admission::Limits::default()),
                crate::admission::Limits::var_queue_wait(&crate::admission::Limits::default()),
                crate::admission::Limits::var_max_message_bytes(&crate::admission::Limits::default()),
                crate::admission::Limits::var_max_concurrent_streams(&crate::admission::Limits::default()),
                crate::admission::Limits::var_max_connections(&crate::admission::Limits::default()),
                crate::authz::AdminIdentities::var(),
                Var::value(
                    REQUIRE_TLS,
                    false,
                    "true: the process refuses to start (exit 64) unless MESH_TLS_CERT_FILE and \
                     MESH_TLS_KEY_FILE are set",
                ),
                Var::unset(
                    HEALTH_LISTEN_ADDR,
                    format!("the gRPC listen host, gRPC port + {HEALTH_PORT_OFFSET}"),
                    "with TLS on: a plaintext listener serving only grpc.health.v1.Health, for \
                     Kubernetes' native gRPC probes (the gRPC port then speaks TLS only); unused \
                     without TLS, where health is on the gRPC port (host:port)",
                ),
            ]
            .into_iter()
            .chain(crate::tls::TlsConfig::vars())
            .collect(),
        )
    }

    /// Settings for tests: both listeners on `127.0.0.1:0`, fast health checks, short grace.
    pub fn for_tests() -> Self {
        Self {
            listen_addr: ([127, 0, 0, 1], 0).into(),
            metrics_addr: ([127, 0, 0, 1], 0).into(),
            shutdown_grace: Duration::from_secs(5),
            drain_delay: Duration::ZERO,
            health_interval: Duration::from_millis(200),
            health_timeout: Duration::from_millis(500),
            health_failure_threshold: 1,
            limits: crate::admission::Limits::default(),
            admin_identities: crate::authz::AdminIdentities::default(),
            tls: None,
            health_listen_addr: None,
        }
    }
}

/// The plaintext health listener's address when `tls` is on:
/// `MESH_HEALTH_LISTEN_ADDR`, else `listen`'s host and port +
/// [`HEALTH_PORT_OFFSET`] (0 stays 0). `None` without TLS.
fn health_addr_for(
    l: &impl Lookup,
    listen: SocketAddr,
    tls: bool,
) -> Result<Option<SocketAddr>, ConfigError> {
    // Read either way, so `--help` checks see the key.
    let set = l.string(keys::HEALTH_LISTEN_ADDR).is_some();
    if set {
        let addr = l.addr_or(keys::HEALTH_LISTEN_ADDR, "")?;
        return Ok(tls.then_some(addr));
    }
    if !tls {
        return Ok(None);
    }
    let port = match listen.port() {
        0 => 0,
        p => p.checked_add(HEALTH_PORT_OFFSET).ok_or_else(|| {
            ConfigError::new(
                keys::HEALTH_LISTEN_ADDR,
                format!("is required when the gRPC port ({p}) + {HEALTH_PORT_OFFSET} is past 65535"),
            )
        })?,
    };
    Ok(Some(SocketAddr::new(listen.ip(), port)))
}

/// `MESH_LISTEN_ADDR` when unset: every interface, the service's port.
fn default_listen_addr(port: u16) -> String {
    format!("0.0.0.0:{port}")
}

/// The default metrics address for gRPC address `listen`: same host, port
/// + [`METRICS_PORT_OFFSET`] (0 stays 0).
fn metrics_addr_for(listen: SocketAddr) -> Result<SocketAddr, ConfigError> {
    let port = match listen.port() {
        0 => 0,
        p => p.checked_add(METRICS_PORT_OFFSET).ok_or_else(|| {
            ConfigError::new(
                keys::METRICS_ADDR,
                format!("is required when the gRPC port ({p}) + {METRICS_PORT_OFFSET} is past 65535"),
            )
        })?,
    };
    Ok(SocketAddr::new(listen.ip(), port))
}

impl crate::TelemetryConfig {
    /// The variables [`crate::TelemetryConfig::from_lookup`] reads, for
    /// `--help`; `service` is the default service name. (Kept here, beside
    /// the other tables and `--help`; a test in this module fails when the
    /// loader reads a variable this table does not list.)
    pub fn vars(service: &'static str) -> VarGroup {
        use crate::telemetry::keys::*;
        VarGroup::new(
            "Telemetry",
            vec![
                Var::unset(
                    OTLP_ENDPOINT,
                    "no export; http://localhost:4317 when OTEL_TRACES_EXPORTER=otlp is set",
                    "OTLP/gRPC collector endpoint for traces, e.g. http://127.0.0.1:4317",
                ),
                Var::unset(
                    OTLP_TRACES_ENDPOINT,
                    OTLP_ENDPOINT,
                    "traces-only override of OTEL_EXPORTER_OTLP_ENDPOINT",
                ),
                Var::unset(
                    TRACES_EXPORTER,
                    "otlp when an endpoint is set, else no export",
                    "where finished spans go: otlp, console (one line per span on stdout) or none",
                ),
                Var::value(
                    TRACES_SAMPLER,
                    "parentbased_always_on",
                    "which traces are recorded: always_on, always_off, traceidratio, parentbased_always_on, \
                     parentbased_always_off or parentbased_traceidratio",
                ),
                Var::value(
                    TRACES_SAMPLER_ARG,
                    "1.0",
                    "the ratio (0.0 to 1.0) of the traceidratio samplers; read only by them",
                )
                .when(TRACES_SAMPLER, "parentbased_traceidratio"),
                Var::value(SERVICE_NAME, service, "the service.name resource attribute of every span"),
                Var::value(
                    RUST_LOG,
                    "info,sqlx=warn,fred=warn,h2=warn",
                    "log filter (tracing EnvFilter directives, e.g. debug or info,mesh_session=debug)",
                ),
                Var::value(LOG_FORMAT, "text", "log format on stdout: text or json"),
                Var::value(
                    SDK_DISABLED,
                    "false",
                    "true turns tracing off: spans are neither recorded, exported nor propagated (logs stay)",
                ),
            ],
        )
    }
}

/// One environment variable a process reads, as `--help` and
/// `docs/CONFIGURATION.md` show it. Every config struct lists its variables
/// in a `vars()` built from the same `keys` constants and defaults its
/// `from_lookup` reads; [`check_help`] proves the two agree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Var {
    /// The variable, e.g. `MESH_LISTEN_ADDR`.
    pub name: &'static str,
    /// What applies when it is unset or empty.
    pub default: VarDefault,
    /// What it means, units included.
    pub meaning: &'static str,
    /// Read only when this other variable has this value (e.g. a sampler's
    /// argument); [`check_help`] sets it when checking this one.
    pub read_when: Option<(&'static str, &'static str)>,
}

/// What applies when a variable is unset or empty.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VarDefault {
    /// This value: setting the variable to it changes nothing.
    Value(String),
    /// Nothing: the process does not start without it.
    Required,
    /// A behaviour no value spells (e.g. `no export`).
    Unset(String),
}

impl Var {
    /// A variable whose default is `default`.
    pub fn value(name: &'static str, default: impl Display, meaning: &'static str) -> Self {
        Self { name, default: VarDefault::Value(default.to_string()), meaning, read_when: None }
    }

    /// A duration in milliseconds whose default is `default`.
    pub fn millis(name: &'static str, default: Duration, meaning: &'static str) -> Self {
        Self::value(name, default.as_millis(), meaning)
    }

    /// A variable that must be set.
    pub fn required(name: &'static str, meaning: &'static str) -> Self {
        Self { name, default: VarDefault::Required, meaning, read_when: None }
    }

    /// A variable whose absence means `behaviour`.
    pub fn unset(name: &'static str, behaviour: impl Into<String>, meaning: &'static str) -> Self {
        Self { name, default: VarDefault::Unset(behaviour.into()), meaning, read_when: None }
    }

    /// Marks the variable as read only when `key` is `value`.
    #[must_use]
    pub fn when(mut self, key: &'static str, value: &'static str) -> Self {
        self.read_when = Some((key, value));
        self
    }

    /// Replaces the default value (a service's own default of a shared variable).
    #[must_use]
    pub fn with_default(mut self, default: impl Display) -> Self {
        self.default = VarDefault::Value(default.to_string());
        self
    }
}

/// The variables of one config struct, under a title.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VarGroup {
    /// E.g. `Server`.
    pub title: &'static str,
    /// In the order `--help` lists them.
    pub vars: Vec<Var>,
}

impl VarGroup {
    /// A group.
    pub fn new(title: &'static str, vars: Vec<Var>) -> Self {
        Self { title, vars }
    }

    /// Marks `name` as required (panics when the group has no such
    /// variable: a programming error a test run catches).
    #[must_use]
    pub fn with_required(mut self, name: &str) -> Self {
        let var = self.vars.iter_mut().find(|v| v.name == name).expect("variable in group");
        var.default = VarDefault::Required;
        self
    }

    /// Replaces the default of `name` (panics when the group has no such
    /// variable: a programming error a test run catches).
    #[must_use]
    pub fn with_default(mut self, name: &str, default: impl Display) -> Self {
        let var = self.vars.iter_mut().find(|v| v.name == name).expect("variable in group");
        *var = var.clone().with_default(default);
        self
    }
}

/// A service binary's `--help`: what it is and every variable it reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Help {
    /// The binary, e.g. `mesh-session`.
    pub binary: &'static str,
    /// One line: what it is.
    pub about: &'static str,
    /// Subcommands besides serving, each a usage line after the binary's
    /// name (e.g. `migrate`); empty for a binary that only serves.
    pub commands: &'static [&'static str],
    /// Every variable the process reads, grouped.
    pub groups: Vec<VarGroup>,
}

/// Width `--help` wraps meanings at.
const HELP_WIDTH: usize = 80;

impl Help {
    /// Every variable's name, in order.
    pub fn names(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.groups.iter().flat_map(|g| g.vars.iter().map(|v| v.name))
    }

    /// The whole `--help` text.
    pub fn render(&self) -> String {
        let b = self.binary;
        let commands: String = self.commands.iter().map(|c| format!("       {b} {c}\n")).collect();
        format!(
            "{b}: {about}\n\nUsage: {b} [-h | --help]\n{commands}\n{vars}",
            about = self.about,
            vars = self.render_vars()
        )
    }

    /// The environment part of `--help`: every variable with its default and meaning.
    pub fn render_vars(&self) -> String {
        let mut out = String::from(
            "Configured from the environment only. An unset or empty variable takes its\n\
             default; a bad value stops the process with exit code 64, naming the variable.\n",
        );
        for g in &self.groups {
            out.push_str(&format!("\n{}:\n", g.title));
            for v in &g.vars {
                let default = match &v.default {
                    VarDefault::Value(d) => format!("default: {d}"),
                    VarDefault::Required => "required".to_owned(),
                    VarDefault::Unset(d) => format!("if unset: {d}"),
                };
                out.push_str(&format!("  {}  ({default})\n", v.name));
                out.push_str(&wrap(v.meaning, "      ", HELP_WIDTH));
            }
        }
        out
    }
}

/// `text` as lines of at most `width` columns (longer words stay whole), each after `indent`.
fn wrap(text: &str, indent: &str, width: usize) -> String {
    let mut out = String::new();
    let mut line = String::new();
    for word in text.split_whitespace() {
        if !line.is_empty() && indent.len() + line.len() + 1 + word.chars().count() > width {
            out.push_str(&format!("{indent}{line}\n"));
            line.clear();
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(word);
    }
    if !line.is_empty() {
        out.push_str(&format!("{indent}{line}\n"));
    }
    out
}

/// Exit code of a command line the binary does not take (as clap's).
pub const EXIT_USAGE: u8 = 2;

/// The command line of a service binary that takes no arguments: `None`
/// when there are none (serve); `-h`/`--help` prints `help()` and gives
/// exit code 0; anything else prints an error naming the argument and
/// gives [`EXIT_USAGE`].
pub fn handle_args(help: impl FnOnce() -> Help) -> Option<ExitCode> {
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    let first = args.first()?;
    let help = help();
    if args.len() == 1 && (first == "-h" || first == "--help") {
        print!("{}", help.render());
        return Some(ExitCode::SUCCESS);
    }
    let b = help.binary;
    eprintln!(
        "{b}: unexpected argument {first:?}: {b} takes no arguments and is configured from the \
         environment (see {b} --help)"
    );
    Some(ExitCode::from(EXIT_USAGE))
}

/// A [`Lookup`] over a map that records every key asked for, so tests can
/// compare what a loader reads with what its `--help` lists.
#[derive(Debug, Default)]
pub struct Recorder {
    values: HashMap<String, String>,
    asked: std::sync::Mutex<BTreeSet<String>>,
}

impl Recorder {
    /// A lookup answering `pairs`.
    pub fn new<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Self {
        Self {
            values: pairs.into_iter().map(|(k, v)| (k.to_owned(), v.to_owned())).collect(),
            ..Self::default()
        }
    }

    /// A copy (nothing asked yet) that also answers `key` with `value`.
    pub fn with(&self, key: &str, value: &str) -> Self {
        let mut values = self.values.clone();
        values.insert(key.to_owned(), value.to_owned());
        Self { values, ..Self::default() }
    }

    /// A copy (nothing asked yet) without `key`.
    pub fn with_removed(&self, key: &str) -> Self {
        let mut values = self.values.clone();
        values.remove(key);
        Self { values, ..Self::default() }
    }

    /// Every key asked for so far.
    pub fn asked(&self) -> BTreeSet<String> {
        self.asked.lock().expect("recorder lock").clone()
    }
}

impl Lookup for Recorder {
    fn get(&self, key: &str) -> Option<String> {
        self.asked.lock().expect("recorder lock").insert(key.to_owned());
        self.values.get(key).cloned()
    }
}

/// Checks `help` against the loader it documents: `load` reads a process's
/// whole configuration from a lookup (telemetry included) with `base` set
/// (the required variables). Problems, each naming a variable: a variable
/// read but not listed, listed but never read, listed twice, or whose
/// documented default changes the configuration when set explicitly.
/// Empty: `help` is exact.
pub fn check_help<T: std::fmt::Debug>(
    help: &Help,
    base: &[(&str, &str)],
    load: impl Fn(&Recorder) -> Result<T, ConfigError>,
) -> Vec<String> {
    let mut problems = Vec::new();
    let listed: Vec<&str> = help.names().collect();
    let mut seen = BTreeSet::new();
    for name in &listed {
        if !seen.insert(*name) {
            problems.push(format!("{name} is listed twice"));
        }
    }
    let base_lookup = Recorder::new(base.iter().copied());
    let reference = match load(&base_lookup) {
        Ok(c) => format!("{c:?}"),
        Err(e) => return vec![format!("the base configuration does not load: {e}")],
    };
    let mut asked = base_lookup.asked();
    for var in help.groups.iter().flat_map(|g| &g.vars) {
        let Some((key, value)) = var.read_when else { continue };
        let l = base_lookup.with(key, value);
        if load(&l).is_ok() && l.asked().contains(var.name) {
            asked.insert(var.name.to_owned());
        }
    }
    for key in &asked {
        if !seen.contains(key.as_str()) {
            problems.push(format!("{key} is read but not listed in --help"));
        }
    }
    for name in &listed {
        if !asked.contains(*name) {
            problems.push(format!("{name} is listed in --help but never read"));
        }
    }
    for var in help.groups.iter().flat_map(|g| &g.vars) {
        let VarDefault::Value(default) = &var.default else { continue };
        if base.iter().any(|(k, _)| *k == var.name) {
            continue;
        }
        let (without, reference) = match var.read_when {
            None => (base_lookup.with_removed(var.name), reference.clone()),
            Some((key, value)) => {
                let l = base_lookup.with(key, value);
                match load(&l) {
                    Ok(c) => (l, format!("{c:?}")),
                    Err(e) => {
                        problems.push(format!("{key}={value} (when {} is read) is refused: {e}", var.name));
                        continue;
                    }
                }
            }
        };
        match load(&without.with(var.name, default)) {
            Ok(c) if format!("{c:?}") == reference => {}
            Ok(_) => problems
                .push(format!("{}={default} (its documented default) changes the configuration", var.name)),
            Err(e) => {
                problems.push(format!("{}={default} (its documented default) is refused: {e}", var.name))
            }
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&'static str, &str)]) -> HashMap<&'static str, String> {
        pairs.iter().map(|(k, v)| (*k, (*v).to_owned())).collect()
    }

    #[test]
    fn server_defaults_follow_the_service_port() {
        let c = ServerConfig::from_lookup(&map(&[]), 50052).unwrap();
        assert_eq!(c.listen_addr, "0.0.0.0:50052".parse().unwrap());
        assert_eq!(c.metrics_addr, "0.0.0.0:51052".parse().unwrap());
        assert_eq!(c.health_failure_threshold, 2);
    }

    #[test]
    fn metrics_port_follows_the_listen_port() {
        let c = ServerConfig::from_lookup(&map(&[(keys::LISTEN_ADDR, "127.0.0.1:50100")]), 50052).unwrap();
        assert_eq!(c.metrics_addr, "127.0.0.1:51100".parse().unwrap());
        let c = ServerConfig::from_lookup(&map(&[(keys::LISTEN_ADDR, "[::1]:0")]), 50052).unwrap();
        assert_eq!(c.metrics_addr, "[::1]:0".parse().unwrap());
        let c = ServerConfig::from_lookup(
            &map(&[(keys::LISTEN_ADDR, "127.0.0.1:50100"), (keys::METRICS_ADDR, "0.0.0.0:9090")]),
            50052,
        )
        .unwrap();
        assert_eq!(c.metrics_addr, "0.0.0.0:9090".parse().unwrap());
        let err = ServerConfig::from_lookup(&map(&[(keys::LISTEN_ADDR, "127.0.0.1:65000")]), 1).unwrap_err();
        assert_eq!(err.key, keys::METRICS_ADDR);
    }

    fn runtime_help() -> Help {
        Help {
            binary: "mesh-test",
            about: "a test",
            commands: &[],
            groups: vec![ServerConfig::vars(50052), crate::TelemetryConfig::vars("mesh-test")],
        }
    }

    fn load_runtime(l: &Recorder) -> Result<(ServerConfig, crate::TelemetryConfig), ConfigError> {
        Ok((ServerConfig::from_lookup(l, 50052)?, crate::TelemetryConfig::from_lookup(l, "mesh-test")?))
    }

    #[test]
    fn help_lists_every_server_and_telemetry_variable_with_its_real_default() {
        assert_eq!(check_help(&runtime_help(), &[], load_runtime), Vec::<String>::new());
        let text = runtime_help().render();
        for name in runtime_help().names() {
            assert!(text.contains(&format!("  {name}  (")), "{name} in\n{text}");
        }
        assert!(text.contains("(default: 0.0.0.0:50052)"), "{text}");
        let meanings = text.lines().filter(|l| l.starts_with("      "));
        assert!(meanings.clone().count() >= runtime_help().names().count(), "{text}");
        for l in meanings {
            assert!(l.chars().count() <= HELP_WIDTH || !l.trim().contains(' '), "{l:?} is too long");
        }
    }

    #[test]
    fn check_help_names_what_is_missing_unread_or_wrong() {
        let mut help = runtime_help();
        help.groups[0].vars.retain(|v| v.name != keys::DRAIN_DELAY_MS);
        help.groups[0].vars.push(Var::value("MESH_NOT_READ", 1, "nothing"));
        help.groups[0] = help.groups[0].clone().with_default(keys::SHUTDOWN_GRACE_MS, 30000);
        let problems = check_help(&help, &[], load_runtime);
        assert_eq!(problems.len(), 3, "{problems:#?}");
        assert!(problems[0].contains(keys::DRAIN_DELAY_MS), "{problems:#?}");
        assert!(problems[1].contains("MESH_NOT_READ"), "{problems:#?}");
        assert!(problems[2].contains(keys::SHUTDOWN_GRACE_MS), "{problems:#?}");
    }

    #[test]
    fn bad_values_name_the_key() {
        let err = ServerConfig::from_lookup(&map(&[(keys::LISTEN_ADDR, "nope")]), 1).unwrap_err();
        assert_eq!(err.key, keys::LISTEN_ADDR);
        let err = ServerConfig::from_lookup(&map(&[(keys::SHUTDOWN_GRACE_MS, "5s")]), 1).unwrap_err();
        assert_eq!(err.key, keys::SHUTDOWN_GRACE_MS);
    }

    #[test]
    fn lists_drop_empty_items() {
        let l = map(&[("K", " a, ,b ,")]);
        assert_eq!(l.list("K"), vec!["a", "b"]);
        assert!(map(&[("K", "  ")]).list("K").is_empty());
    }
}
