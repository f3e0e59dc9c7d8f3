//! Where a client's endpoints come from: a [`Target`] from configuration
//! (`MESH_RATELIMIT_ADDR=…`), kept in step with DNS.
//!
//! A target is a comma-separated list of `host:port`, `http://host:port` or
//! `dns:///host:port` entries. IP entries are endpoints as they are. Names
//! are resolved, every address they resolve to becomes an endpoint, and they
//! are resolved again every refresh period: a Kubernetes headless Service
//! name answers with one address per ready pod, so scaling, rollouts and
//! evictions reach the balancer within a period. A failed resolution keeps
//! the addresses last resolved (DNS hiccups must not empty the balancer).

use std::{
    collections::HashMap,
    fmt, io,
    net::{IpAddr, SocketAddr},
    str::FromStr,
    sync::Arc,
    time::Duration,
};

use futures::future::BoxFuture;

use crate::balance::{Balance, EndpointAddr};

/// One configured entry.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Authority {
    /// A DNS name or an IP address.
    pub host: Arc<str>,
    /// The port.
    pub port: u16,
}

impl Authority {
    fn ip(&self) -> Option<IpAddr> {
        self.host.parse().ok()
    }
}

impl fmt::Display for Authority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.ip() {
            Some(IpAddr::V6(ip)) => write!(f, "[{ip}]:{}", self.port),
            _ => write!(f, "{}:{}", self.host, self.port),
        }
    }
}

/// The endpoints of one upstream service, as configured (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    entries: Vec<Authority>,
}

impl Target {
    /// The configured entries.
    pub fn entries(&self) -> &[Authority] {
        &self.entries
    }

    /// Whether every entry is an IP address (nothing to resolve).
    pub fn is_static(&self) -> bool {
        self.entries.iter().all(|e| e.ip().is_some())
    }
}

fn parse_entry(raw: &str) -> Result<Authority, String> {
    // Never echo an entry that may carry a password.
    if raw.contains('@') {
        return Err(
            "an entry carries credentials (user@ or user:password@), which are not supported".to_owned()
        );
    }
    let rest = match raw.split_once("://") {
        None => raw,
        Some(("http", rest)) => rest,
        // gRPC name syntax: dns:[//authority/]host:port, the DNS server part ignored.
        Some(("dns", rest)) => rest.split_once('/').map_or(rest, |(_, r)| r),
        Some(("https", _)) => {
            return Err(format!(
                "{raw:?}: write http:// or host:port; TLS comes from MESH_TLS_CERT_FILE, MESH_TLS_KEY_FILE and MESH_TLS_CA_FILE, not from the scheme"
            ));
        }
        Some((scheme, _)) => return Err(format!("{raw:?}: unknown scheme {scheme:?}")),
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if let Ok(sa) = rest.parse::<SocketAddr>() {
        return Ok(Authority { host: sa.ip().to_string().into(), port: sa.port() });
    }
    let (host, port) = rest.rsplit_once(':').ok_or_else(|| format!("{raw:?}: expected host:port"))?;
    let port: u16 = port.parse().map_err(|_| format!("{raw:?}: {port:?} is not a port"))?;
    let valid = !host.is_empty()
        && host.len() <= 253
        && host.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_');
    if !valid || port == 0 {
        return Err(format!("{raw:?}: expected host:port"));
    }
    Ok(Authority { host: host.to_ascii_lowercase().into(), port })
}

impl FromStr for Target {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let entries = s
            .split(',')
            .map(str::trim)
            .filter(|e| !e.is_empty())
            .map(parse_entry)
            .collect::<Result<Vec<_>, _>>()?;
        if entries.is_empty() {
            return Err("no endpoints given".to_owned());
        }
        Ok(Self { entries })
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.entries.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            e.fmt(f)?;
        }
        Ok(())
    }
}

/// Resolves a host name to addresses.
pub trait Resolve: Send + Sync + 'static {
    /// Every address of `host`, with `port`.
    fn resolve(&self, host: &str, port: u16) -> BoxFuture<'static, io::Result<Vec<SocketAddr>>>;
}

/// The system resolver (`getaddrinfo`: `/etc/hosts`, then DNS).
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemResolver;

impl Resolve for SystemResolver {
    fn resolve(&self, host: &str, port: u16) -> BoxFuture<'static, io::Result<Vec<SocketAddr>>> {
        let host = host.to_owned();
        Box::pin(async move { Ok(tokio::net::lookup_host((host.as_str(), port)).await?.collect()) })
    }
}

/// How long one resolution may take before it counts as failed.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);
/// Resolution period while nothing resolves.
const RETRY_EMPTY: Duration = Duration::from_secs(1);

/// Keeps `balance`'s endpoints in step with `target`: set at once when every
/// entry is an IP; otherwise resolved in a background task (calls wait for its
/// first answer) every `refresh`, until the balancer is dropped.
pub fn discover<S>(balance: &Balance<S>, target: &Target, refresh: Duration, resolver: Arc<dyn Resolve>)
where
    S: Send + Sync + 'static,
{
    let fixed = |e: &Authority| {
        e.ip().map(|ip| EndpointAddr { addr: SocketAddr::new(ip, e.port), host: e.host.clone() })
    };
    if target.is_static() {
        balance.set_endpoints(target.entries.iter().filter_map(fixed));
        return;
    }
    let weak = balance.downgrade();
    let upstream = balance.upstream().clone();
    let entries = target.entries.clone();
    tokio::spawn(async move {
        // What each entry resolved to last.
        let mut known: HashMap<usize, Vec<EndpointAddr>> = HashMap::new();
        let mut failing: HashMap<usize, String> = HashMap::new();
        loop {
            for (i, entry) in entries.iter().enumerate() {
                if let Some(ep) = fixed(entry) {
                    known.insert(i, vec![ep]);
                    continue;
                }
                let answer = tokio::time::timeout(RESOLVE_TIMEOUT, resolver.resolve(&entry.host, entry.port))
                    .await
                    .unwrap_or_else(|_| Err(io::Error::new(io::ErrorKind::TimedOut, "timed out")));
                match answer {
                    Ok(addrs) if !addrs.is_empty() => {
                        if failing.remove(&i).is_some() {
                            tracing::info!(upstream = %upstream, host = %entry.host, "resolving again");
                        }
                        let eps =
                            addrs.into_iter().map(|addr| EndpointAddr { addr, host: entry.host.clone() });
                        known.insert(i, eps.collect());
                    }
                    other => {
                        let error = match other {
                            Err(e) => e.to_string(),
                            Ok(_) => "no addresses".to_owned(),
                        };
                        // Warn when it starts failing or fails differently, not every period.
                        if failing.get(&i) != Some(&error) {
                            tracing::warn!(
                                upstream = %upstream,
                                host = %entry.host,
                                error = %error,
                                "cannot resolve endpoints, keeping the last known"
                            );
                            failing.insert(i, error);
                        }
                    }
                }
            }
            let Some(balance) = Balance::upgrade(&weak) else { return };
            let all: Vec<EndpointAddr> = known.values().flatten().cloned().collect();
            let empty = all.is_empty();
            if empty {
                let why = failing.iter().map(|(i, e)| format!("{}: {e}", entries[*i])).collect::<Vec<_>>();
                balance.resolution_failed(format!("cannot resolve {}", why.join("; ")));
            } else {
                balance.set_endpoints(all);
            }
            drop(balance);
            tokio::time::sleep(if empty { RETRY_EMPTY.min(refresh) } else { refresh }).await;
            if weak.strong_count() == 0 {
                return;
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::{
        ClientMetrics,
        balance::BalanceConfig,
        breaker::{BreakerConfig, CircuitBreakerLayer},
    };
    use tower::Layer;

    #[test]
    fn targets_parse_every_accepted_form() {
        let t: Target =
            "10.0.0.1:50052, http://ratelimit:50052,dns:///mesh-ratelimit-headless.mesh.svc:50052,[::1]:7"
                .parse()
                .unwrap();
        let got: Vec<String> = t.entries().iter().map(ToString::to_string).collect();
        assert_eq!(
            got,
            ["10.0.0.1:50052", "ratelimit:50052", "mesh-ratelimit-headless.mesh.svc:50052", "[::1]:7"]
        );
        assert!(!t.is_static());
        assert!("http://127.0.0.1:1/,127.0.0.2:2".parse::<Target>().unwrap().is_static());
        assert_eq!("dns://8.8.8.8/Svc:9".parse::<Target>().unwrap().to_string(), "svc:9");
        for bad in ["", " , ", "host", "host:port", "host:0", "https://svc:443", "grpc://x:1", "a b:1", ":80"]
        {
            assert!(bad.parse::<Target>().is_err(), "{bad:?}");
        }
        assert!(!"http://u:secret@h:1".parse::<Target>().unwrap_err().contains("secret"));
        assert_eq!(
            "https://svc:443".parse::<Target>().unwrap_err(),
            r#""https://svc:443": write http:// or host:port; TLS comes from MESH_TLS_CERT_FILE, MESH_TLS_KEY_FILE and MESH_TLS_CA_FILE, not from the scheme"#
        );
    }

    /// Answers what the test says, like a headless Service scaling.
    #[derive(Default)]
    struct Fake(Mutex<HashMap<String, io::Result<Vec<SocketAddr>>>>);

    impl Fake {
        fn set(&self, host: &str, answer: io::Result<Vec<SocketAddr>>) {
            self.0.lock().unwrap().insert(host.to_owned(), answer);
        }
    }

    impl Resolve for Fake {
        fn resolve(&self, host: &str, port: u16) -> BoxFuture<'static, io::Result<Vec<SocketAddr>>> {
            let answer = match self.0.lock().unwrap().get(host) {
                Some(Ok(addrs)) => Ok(addrs.iter().map(|a| SocketAddr::new(a.ip(), port)).collect()),
                Some(Err(e)) => Err(io::Error::new(e.kind(), e.to_string())),
                None => Err(io::Error::new(io::ErrorKind::NotFound, "no such host")),
            };
            Box::pin(async move { answer })
        }
    }

    fn ip(last: u8) -> SocketAddr {
        ([10, 0, 0, last], 0).into()
    }

    fn balance()
    -> Balance<tower::util::BoxCloneSyncService<http::Request<()>, http::Response<()>, crate::BoxError>> {
        Balance::new("svc", BalanceConfig::default(), ClientMetrics::default(), |a| {
            let svc = tower::service_fn(|_req: http::Request<()>| async {
                Ok::<_, crate::BoxError>(http::Response::new(()))
            });
            CircuitBreakerLayer::new(
                &BreakerConfig::default(),
                "svc",
                a.to_string(),
                ClientMetrics::default(),
            )
            .layer(tower::util::BoxCloneSyncService::new(svc))
        })
    }

    fn endpoints<S>(b: &Balance<S>) -> Vec<String> {
        let mut v: Vec<String> =
            b.endpoints().into_iter().map(|e| format!("{}={}", e.addr.host, e.addr)).collect();
        v.sort();
        v
    }

    #[tokio::test(start_paused = true)]
    async fn names_are_resolved_again_and_failures_keep_the_last_answer() {
        let fake = Arc::new(Fake::default());
        fake.set("svc-headless", Ok(vec![ip(1)]));
        let b = balance();
        let target: Target = "svc-headless:50052,10.0.0.9:50052".parse().unwrap();
        discover(&b, &target, Duration::from_secs(5), fake.clone());
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(endpoints(&b), ["10.0.0.9=10.0.0.9:50052", "svc-headless=10.0.0.1:50052"]);

        // Scaled up: the new pod appears within a period.
        fake.set("svc-headless", Ok(vec![ip(1), ip(2)]));
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(endpoints(&b).len(), 3);
        // DNS fails: nothing changes.
        fake.set("svc-headless", Err(io::Error::other("servfail")));
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(endpoints(&b).len(), 3);
        // A pod went away.
        fake.set("svc-headless", Ok(vec![ip(2)]));
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(endpoints(&b), ["10.0.0.9=10.0.0.9:50052", "svc-headless=10.0.0.2:50052"]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_name_that_never_resolves_fails_calls_with_the_reason() {
        use tower::Service;
        let b = balance();
        discover(&b, &"nowhere:1".parse().unwrap(), Duration::from_secs(5), Arc::new(Fake::default()));
        let err = b.clone().call(http::Request::new(())).await.unwrap_err();
        assert_eq!(err.to_string(), "svc: no endpoints (cannot resolve nowhere:1: no such host)");
    }

    #[tokio::test]
    async fn the_system_resolver_knows_localhost() {
        let addrs = SystemResolver.resolve("localhost", 80).await.unwrap();
        assert!(addrs.iter().any(|a| a.ip().is_loopback() && a.port() == 80), "{addrs:?}");
    }
}
