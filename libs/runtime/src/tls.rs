//! Mutual TLS between mesh services (rustls, the `ring` provider sqlx
//! already links).
//!
//! TLS is on when `MESH_TLS_CERT_FILE` and `MESH_TLS_KEY_FILE` are set; then
//! `MESH_TLS_CA_FILE` is required. The same three files serve both ends of a
//! hop: a server presents the certificate and requires one from every
//! caller, chained to the CA bundle (a caller without one, with one from
//! another CA, or speaking plaintext fails the handshake); a mesh client
//! presents the certificate and verifies the server against the bundle and
//! the host name it dialled (a DNS or IP SAN).
//!
//! The files are read again every `MESH_TLS_RELOAD_INTERVAL_MS` and, when
//! their bytes changed and they load, the new certificate, key and CA bundle
//! apply to every connection accepted or opened from then on; connections
//! already open keep theirs. A set that does not load (a key that does not
//! match the certificate, half-written files) is refused with a warning and
//! the old set stays.
//!
//! The caller's identity is the first `spiffe://` URI SAN of its leaf
//! certificate ([`identity_of`]), computed once per connection and put in
//! every request's extensions as [`CallerIdentity`].

use std::{
    io,
    path::{Path, PathBuf},
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use arc_swap::ArcSwap;
use futures::Stream;
use http::Uri;
use hyper_util::rt::TokioIo;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
};
use tokio_rustls::rustls::{
    self, ClientConfig, RootCertStore, ServerConfig,
    crypto::CryptoProvider,
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject},
    server::WebPkiClientVerifier,
};
use tokio_util::sync::CancellationToken;
use tonic::transport::server::{Connected, TcpConnectInfo};

use crate::{ConfigError, Lookup, LookupExt, config::Var, identity::CallerIdentity, killable::KillableIo};

/// Keys read by [`TlsConfig::from_lookup`].
pub mod keys {
    /// PEM certificate chain this process presents (server and client).
    pub const CERT_FILE: &str = "MESH_TLS_CERT_FILE";
    /// PEM private key of that certificate.
    pub const KEY_FILE: &str = "MESH_TLS_KEY_FILE";
    /// PEM bundle of the CAs trusted for peers.
    pub const CA_FILE: &str = "MESH_TLS_CA_FILE";
    /// How often the three files are read again (ms).
    pub const RELOAD_INTERVAL_MS: &str = "MESH_TLS_RELOAD_INTERVAL_MS";
}

/// Default of `MESH_TLS_RELOAD_INTERVAL_MS`.
pub const DEFAULT_RELOAD_INTERVAL: Duration = Duration::from_secs(5);

/// How long a server waits for a caller to finish its TLS handshake before
/// closing the connection (handshakes run off the accept loop).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Where this process's certificate, key and trusted CAs are.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TlsConfig {
    /// `MESH_TLS_CERT_FILE`: PEM chain, leaf first.
    pub cert_file: PathBuf,
    /// `MESH_TLS_KEY_FILE`: PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
    /// `MESH_TLS_CA_FILE`: PEM CA bundle peers are verified against.
    pub ca_file: PathBuf,
    /// `MESH_TLS_RELOAD_INTERVAL_MS`: how often the files are read again.
    pub reload_interval: Duration,
}

impl TlsConfig {
    /// Files at these paths, read again every [`DEFAULT_RELOAD_INTERVAL`].
    pub fn new(
        cert_file: impl Into<PathBuf>,
        key_file: impl Into<PathBuf>,
        ca_file: impl Into<PathBuf>,
    ) -> Self {
        Self {
            cert_file: cert_file.into(),
            key_file: key_file.into(),
            ca_file: ca_file.into(),
            reload_interval: DEFAULT_RELOAD_INTERVAL,
        }
    }

    /// Reads the TLS keys: `None` when neither `MESH_TLS_CERT_FILE` nor
    /// `MESH_TLS_KEY_FILE` is set (plaintext). Errors name the key at fault:
    /// one of the pair without the other, no `MESH_TLS_CA_FILE`, or files
    /// that do not load (unreadable, no PEM certificate, a key that does not
    /// match the certificate). Key material never appears in an error.
    pub fn from_lookup(l: &impl Lookup) -> Result<Option<Self>, ConfigError> {
        use keys::*;
        let reload_interval = l.millis_or(RELOAD_INTERVAL_MS, DEFAULT_RELOAD_INTERVAL)?;
        if reload_interval.is_zero() {
            return Err(ConfigError::new(RELOAD_INTERVAL_MS, "must be greater than 0"));
        }
        let (cert, key, ca) = (l.string(CERT_FILE), l.string(KEY_FILE), l.string(CA_FILE));
        let (cert, key) = match (cert, key) {
            (None, None) => return Ok(None),
            (Some(_), None) => {
                return Err(ConfigError::new(KEY_FILE, format!("is required when {CERT_FILE} is set")));
            }
            (None, Some(_)) => {
                return Err(ConfigError::new(CERT_FILE, format!("is required when {KEY_FILE} is set")));
            }
            (Some(c), Some(k)) => (c, k),
        };
        let ca = ca.ok_or_else(|| {
            ConfigError::new(
                CA_FILE,
                format!("is required when {CERT_FILE} and {KEY_FILE} are set (callers' certificates are verified against it)"),
            )
        })?;
        let config =
            Self { cert_file: cert.into(), key_file: key.into(), ca_file: ca.into(), reload_interval };
        Material::build(&config.read()?)?;
        Ok(Some(config))
    }

    /// The variables [`Self::from_lookup`] reads, for `--help`.
    pub fn vars() -> Vec<Var> {
        use keys::*;
        vec![
            Var::unset(
                CERT_FILE,
                "plaintext (no TLS)",
                "PEM certificate chain this process presents, as a server and to the services it calls; \
                 with MESH_TLS_KEY_FILE it turns TLS on: every caller must then present a certificate \
                 chained to MESH_TLS_CA_FILE, and the caller's identity is the certificate's first \
                 spiffe:// URI SAN. Re-read when it changes (no restart)",
            ),
            Var::unset(KEY_FILE, "plaintext (no TLS)", "PEM private key of MESH_TLS_CERT_FILE"),
            Var::unset(
                CA_FILE,
                "required when MESH_TLS_CERT_FILE is set",
                "PEM bundle of the CAs trusted for peers: callers' client certificates and the servers \
                 this process calls",
            ),
            Var::millis(
                RELOAD_INTERVAL_MS,
                DEFAULT_RELOAD_INTERVAL,
                "how often the three TLS files are read again; changed files that load apply to new \
                 connections, open ones keep theirs (ms)",
            ),
        ]
    }

    /// Reads the three files (their bytes, not parsed).
    fn read(&self) -> Result<Files, ConfigError> {
        let read = |key: &'static str, path: &Path| {
            std::fs::read(path)
                .map_err(|e| ConfigError::new(key, format!("cannot read {}: {e}", path.display())))
        };
        Ok(Files {
            cert: read(keys::CERT_FILE, &self.cert_file)?,
            key: read(keys::KEY_FILE, &self.key_file)?,
            ca: read(keys::CA_FILE, &self.ca_file)?,
        })
    }

    /// Loads the files and starts reloading them every
    /// [`TlsConfig::reload_interval`] (in a task of the current Tokio
    /// runtime that ends when the last clone of the handle is dropped).
    pub fn load(&self) -> Result<MeshTls, ConfigError> {
        let files = self.read()?;
        let material = Material::build(&files)?;
        let shared = Arc::new(Shared { current: ArcSwap::from_pointee(material) });
        tokio::spawn(reload(self.clone(), files, Arc::downgrade(&shared)));
        Ok(MeshTls { shared })
    }
}

/// The raw bytes of the three files.
#[derive(PartialEq, Eq)]
struct Files {
    cert: Vec<u8>,
    key: Vec<u8>,
    ca: Vec<u8>,
}

/// Both ends' rustls configurations built from one set of files.
#[derive(Debug)]
struct Material {
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
    identity: Option<CallerIdentity>,
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl Material {
    fn build(files: &Files) -> Result<Self, ConfigError> {
        use keys::*;
        let invalid = |key: &'static str, what: String| ConfigError::new(key, what);
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&files.cert)
            .collect::<Result<_, _>>()
            .map_err(|e| invalid(CERT_FILE, format!("not a PEM certificate chain: {e}")))?;
        if chain.is_empty() {
            return Err(invalid(CERT_FILE, "holds no PEM certificate".into()));
        }
        let identity = identity_of(&chain[0]);
        // The error never carries the key's bytes (pki-types reports only the section kind).
        let key = PrivateKeyDer::from_pem_slice(&files.key)
            .map_err(|e| invalid(KEY_FILE, format!("not a PEM private key: {e}")))?;
        let mut roots = RootCertStore::empty();
        for ca in CertificateDer::pem_slice_iter(&files.ca) {
            let ca = ca.map_err(|e| invalid(CA_FILE, format!("not a PEM certificate bundle: {e}")))?;
            roots.add(ca).map_err(|e| invalid(CA_FILE, format!("not a usable CA certificate: {e}")))?;
        }
        if roots.is_empty() {
            return Err(invalid(CA_FILE, "holds no PEM certificate".into()));
        }
        let roots = Arc::new(roots);
        let provider = provider();
        let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .map_err(|e| invalid(CA_FILE, format!("cannot verify clients with it: {e}")))?;
        let mismatch = |e: rustls::Error| invalid(KEY_FILE, format!("does not go with {CERT_FILE}: {e}"));
        let mut server = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(mismatch)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(mismatch)?;
        server.alpn_protocols = vec![b"h2".to_vec()];
        let mut client = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(mismatch)?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(mismatch)?;
        client.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Self { server: Arc::new(server), client: Arc::new(client), identity })
    }
}

#[derive(Debug)]
struct Shared {
    current: ArcSwap<Material>,
}

/// Reads the files every interval; swaps in what changed and loads.
async fn reload(config: TlsConfig, mut loaded: Files, shared: std::sync::Weak<Shared>) {
    let mut refused: Option<Files> = None;
    let mut tick = tokio::time::interval(config.reload_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        let Some(shared) = shared.upgrade() else { return };
        let files = match config.read() {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(error = %e, "tls files unreadable, keeping the loaded certificate");
                continue;
            }
        };
        if files == loaded || refused.as_ref() == Some(&files) {
            continue;
        }
        match Material::build(&files) {
            Ok(m) => {
                tracing::info!(identity = ?m.identity.as_ref().map(CallerIdentity::as_str), "tls certificate reloaded");
                shared.current.store(Arc::new(m));
                loaded = files;
                refused = None;
            }
            Err(e) => {
                // Warned once per content: a rotation writing the cert and
                // the key one after the other passes through such a state.
                tracing::warn!(error = %e, "tls files changed but do not load, keeping the loaded certificate");
                refused = Some(files);
            }
        }
    }
}

/// A loaded TLS configuration that follows its files (see the module docs).
/// Cheap to clone; clones share the reloading.
#[derive(Debug, Clone)]
pub struct MeshTls {
    shared: Arc<Shared>,
}

impl MeshTls {
    /// The rustls server configuration in force (client certificates required).
    pub fn server_config(&self) -> Arc<ServerConfig> {
        self.shared.current.load().server.clone()
    }

    /// The rustls client configuration in force (presents the certificate).
    pub fn client_config(&self) -> Arc<ClientConfig> {
        self.shared.current.load().client.clone()
    }

    /// The identity of this process's own certificate, if it has one.
    pub fn identity(&self) -> Option<CallerIdentity> {
        self.shared.current.load().identity.clone()
    }

    /// A connector for tonic's `Endpoint::connect_with_connector_lazy`:
    /// TCP to the endpoint's address, then TLS verifying the server as
    /// `server_name` (a host name or an IP address). Every new connection
    /// uses the configuration in force, so reloaded certificates apply from
    /// the next (re)connection on.
    pub fn connector(&self, server_name: &str) -> Result<TlsConnector, ConfigError> {
        let name = server_name.trim_start_matches('[').trim_end_matches(']');
        let server_name = ServerName::try_from(name.to_owned()).map_err(|e| {
            ConfigError::new(keys::CA_FILE, format!("cannot verify a server as {name:?}: {e}"))
        })?;
        Ok(TlsConnector { tls: self.clone(), server_name })
    }
}

/// The first URI SAN of `cert` starting with `spiffe://`; `None` when the
/// certificate does not parse or has none.
pub fn identity_of(cert: &[u8]) -> Option<CallerIdentity> {
    use x509_parser::{extensions::GeneralName, prelude::FromDer as _};
    let (_, parsed) = x509_parser::certificate::X509Certificate::from_der(cert).ok()?;
    let san = parsed.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|n| match n {
        GeneralName::URI(uri) if uri.starts_with("spiffe://") => Some(CallerIdentity((*uri).to_owned())),
        _ => None,
    })
}

/// Dials TLS for a tonic channel (see [`MeshTls::connector`]).
#[derive(Debug, Clone)]
pub struct TlsConnector {
    tls: MeshTls,
    server_name: ServerName<'static>,
}

impl tower::Service<Uri> for TlsConnector {
    type Response = TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let connector = tokio_rustls::TlsConnector::from(self.tls.client_config());
        let name = self.server_name.clone();
        Box::pin(async move {
            let host =
                uri.host().unwrap_or_default().trim_start_matches('[').trim_end_matches(']').to_owned();
            let port = uri.port_u16().unwrap_or(443);
            let tcp = TcpStream::connect((host.as_str(), port)).await?;
            let _ = tcp.set_nodelay(true);
            Ok(TokioIo::new(connector.connect(name, tcp).await?))
        })
    }
}

/// One accepted connection: plaintext, or TLS with the caller's identity.
#[derive(Debug)]
pub(crate) enum ServerConn {
    /// No TLS configured.
    Plain(KillableIo),
    /// A completed handshake with a verified client certificate.
    Tls(Box<tokio_rustls::server::TlsStream<KillableIo>>, Option<CallerIdentity>),
}

/// What the server knows about a connection's peer; the [`PeerLayer`] puts
/// its parts in every request's extensions.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    /// Addresses (also what `tonic::Request::remote_addr` reads).
    pub tcp: TcpConnectInfo,
    /// The verified identity, under TLS.
    pub identity: Option<CallerIdentity>,
}

impl Connected for ServerConn {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        match self {
            Self::Plain(io) => PeerInfo { tcp: io.connect_info(), identity: None },
            Self::Tls(io, identity) => {
                PeerInfo { tcp: io.get_ref().0.connect_info(), identity: identity.clone() }
            }
        }
    }
}

macro_rules! delegate {
    ($self:ident, $io:ident => $e:expr) => {
        match $self.get_mut() {
            ServerConn::Plain($io) => {
                let $io = Pin::new($io);
                $e
            }
            ServerConn::Tls($io, _) => {
                let $io = Pin::new(&mut **$io);
                $e
            }
        }
    };
}

impl AsyncRead for ServerConn {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        delegate!(self, io => io.poll_read(cx, buf))
    }
}

impl AsyncWrite for ServerConn {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        delegate!(self, io => io.poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        delegate!(self, io => io.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Self::Plain(io) => io.is_write_vectored(),
            Self::Tls(io, _) => io.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, io => io.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, io => io.poll_shutdown(cx))
    }
}

/// The connections a server serves, accepted from `listener` until `stop`
/// resolves (the listener is closed then). Every socket is wrapped so
/// `cut` can abort it. With `tls`, each handshake runs in a task of its own
/// (at most [`HANDSHAKE_TIMEOUT`]), so a slow or silent caller never holds
/// up the accept loop; failed handshakes (plaintext callers, no or an
/// untrusted certificate) are logged at debug and dropped.
pub(crate) fn incoming(
    listener: TcpListener,
    cut: CancellationToken,
    tls: Option<MeshTls>,
    stop: impl Future<Output = ()> + Send + 'static,
) -> impl Stream<Item = io::Result<ServerConn>> + Send + 'static {
    let (tx, rx) = tokio::sync::mpsc::channel::<io::Result<ServerConn>>(64);
    tokio::spawn(async move {
        tokio::pin!(stop);
        loop {
            let accepted = tokio::select! {
                () = &mut stop => return,
                () = tx.closed() => return,
                a = listener.accept() => a,
            };
            let tcp = match accepted {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    // Per-connection errors (EMFILE, ECONNABORTED): tonic's own loop
                    // would log and go on; back off briefly so EMFILE cannot spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let io = KillableIo::new(tcp, &cut);
            match &tls {
                None => {
                    if tx.send(Ok(ServerConn::Plain(io))).await.is_err() {
                        return;
                    }
                }
                Some(tls) => {
                    let acceptor = tokio_rustls::TlsAcceptor::from(tls.server_config());
                    let tx = tx.clone();
                    tokio::spawn(async move {
                        let peer = io.connect_info().remote_addr;
                        match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(io)).await {
                            Ok(Ok(stream)) => {
                                let identity = stream
                                    .get_ref()
                                    .1
                                    .peer_certificates()
                                    .and_then(|c| c.first())
                                    .and_then(|c| identity_of(c));
                                let _ = tx.send(Ok(ServerConn::Tls(Box::new(stream), identity))).await;
                            }
                            Ok(Err(e)) => tracing::debug!(peer = ?peer, error = %e, "tls handshake failed"),
                            Err(_) => tracing::debug!(peer = ?peer, "tls handshake timed out"),
                        }
                    });
                }
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// Puts the connection's [`TcpConnectInfo`] and, under TLS, the caller's
/// [`CallerIdentity`] into every request's extensions.
#[derive(Debug, Clone, Copy, Default)]
pub struct PeerLayer;

impl<S> tower::Layer<S> for PeerLayer {
    type Service = Peer<S>;

    fn layer(&self, inner: S) -> Peer<S> {
        Peer { inner }
    }
}

/// The service of [`PeerLayer`].
#[derive(Debug, Clone)]
pub struct Peer<S> {
    inner: S,
}

impl<S, B> tower::Service<http::Request<B>> for Peer<S>
where
    S: tower::Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> S::Future {
        if let Some(peer) = req.extensions_mut().remove::<PeerInfo>() {
            req.extensions_mut().insert(peer.tcp);
            if let Some(id) = peer.identity {
                req.extensions_mut().insert(id);
            }
        }
        self.inner.call(req)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use mesh_testkit::tls::TestPki;

    use super::*;
    use crate::{ServerConfig, config::keys as server_keys};

    fn leaf(path: &Path) -> Vec<u8> {
        CertificateDer::pem_file_iter(path).unwrap().next().unwrap().unwrap().to_vec()
    }

    #[test]
    fn the_identity_is_the_certificates_spiffe_uri_san() {
        let dir = tempfile::tempdir().unwrap();
        let pki = TestPki::new(dir.path());
        let (cert, _) = pki.issue("data", "spiffe://mesh.local/ns/default/sa/data");
        assert_eq!(
            identity_of(&leaf(&cert)),
            Some(CallerIdentity("spiffe://mesh.local/ns/default/sa/data".into()))
        );
        // A certificate whose URI SAN is no SPIFFE id has no identity.
        let (cert, _) = pki.issue("web", "https://example.com/web");
        assert_eq!(identity_of(&leaf(&cert)), None);
        assert_eq!(identity_of(b"not a certificate"), None);
    }

    fn env(pairs: &[(&'static str, String)]) -> HashMap<&'static str, String> {
        pairs.iter().cloned().collect()
    }

    #[test]
    fn tls_needs_the_pair_a_ca_and_files_that_load() {
        let dir = tempfile::tempdir().unwrap();
        let pki = TestPki::new(dir.path());
        let (cert, key) = pki.issue("a", "spiffe://mesh.local/a");
        let (_, other_key) = pki.issue("b", "spiffe://mesh.local/b");
        let p = |p: &Path| p.to_string_lossy().into_owned();
        let ca = p(&pki.ca_path());
        assert_eq!(TlsConfig::from_lookup(&env(&[])).unwrap(), None);
        for (pairs, at_fault) in [
            (vec![(keys::CERT_FILE, p(&cert))], keys::KEY_FILE),
            (vec![(keys::KEY_FILE, p(&key))], keys::CERT_FILE),
            (vec![(keys::CERT_FILE, p(&cert)), (keys::KEY_FILE, p(&key))], keys::CA_FILE),
            (
                vec![
                    (keys::CERT_FILE, p(&cert)),
                    (keys::KEY_FILE, p(&other_key)),
                    (keys::CA_FILE, ca.clone()),
                ],
                keys::KEY_FILE,
            ),
            (
                vec![(keys::CERT_FILE, p(&key)), (keys::KEY_FILE, p(&key)), (keys::CA_FILE, ca.clone())],
                keys::CERT_FILE,
            ),
            (
                vec![
                    (keys::CERT_FILE, p(&cert)),
                    (keys::KEY_FILE, p(&key)),
                    (keys::CA_FILE, "/nonexistent".into()),
                ],
                keys::CA_FILE,
            ),
        ] {
            let err = TlsConfig::from_lookup(&env(&pairs)).unwrap_err();
            assert_eq!(err.key, at_fault, "{pairs:?}: {err}");
            assert!(!err.to_string().contains("PRIVATE KEY-----"), "{err}");
        }
        let ok = [(keys::CERT_FILE, p(&cert)), (keys::KEY_FILE, p(&key)), (keys::CA_FILE, ca)];
        let tls = TlsConfig::from_lookup(&env(&ok)).unwrap().unwrap();
        assert_eq!(tls.reload_interval, DEFAULT_RELOAD_INTERVAL);

        // The server: plaintext health on gRPC port + 2000 unless set.
        let mut server = ok.to_vec();
        server.push((server_keys::LISTEN_ADDR, "127.0.0.1:50052".into()));
        let c = ServerConfig::from_lookup(&env(&server), 1).unwrap();
        assert_eq!(c.health_listen_addr, Some("127.0.0.1:52052".parse().unwrap()));
        server.push((server_keys::HEALTH_LISTEN_ADDR, "0.0.0.0:8086".into()));
        let c = ServerConfig::from_lookup(&env(&server), 1).unwrap();
        assert_eq!(c.health_listen_addr, Some("0.0.0.0:8086".parse().unwrap()));
        assert!(c.tls.is_some());
        server.push((server_keys::REQUIRE_TLS, "true".into()));
        assert!(ServerConfig::from_lookup(&env(&server), 1).is_ok());
    }

    #[test]
    fn require_tls_refuses_to_start_without_it() {
        let err =
            ServerConfig::from_lookup(&env(&[(server_keys::REQUIRE_TLS, "true".into())]), 1).unwrap_err();
        assert_eq!(err.key, server_keys::REQUIRE_TLS);
        assert!(err.to_string().contains(keys::CERT_FILE), "{err}");
        let c = ServerConfig::from_lookup(&env(&[(server_keys::REQUIRE_TLS, "false".into())]), 1).unwrap();
        assert!(c.tls.is_none() && c.health_listen_addr.is_none());
    }
}
