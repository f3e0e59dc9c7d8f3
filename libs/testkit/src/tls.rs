//! A throwaway PKI for tests: a CA and leaf certificates (rcgen) written as
//! PEM files into a directory, in the shape the mesh reads them
//! (`MESH_TLS_CERT_FILE`, `MESH_TLS_KEY_FILE`, `MESH_TLS_CA_FILE`).

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
};

use mesh_runtime::tls::TlsConfig;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use tonic::transport::{Channel, Endpoint};

/// A CA whose certificate is `<dir>/ca.pem`, issuing leaf certificates
/// into the same directory.
#[derive(Debug)]
pub struct TestPki {
    dir: PathBuf,
    ca_path: PathBuf,
    issuer: Issuer<'static, KeyPair>,
}

impl TestPki {
    /// A new CA (ECDSA P-256, valid from now on for a year) written to
    /// `<dir>/ca.pem`; `dir` is created if missing. Panics when the
    /// directory cannot be written (a test setup failure).
    pub fn new(dir: impl AsRef<Path>) -> Self {
        let dir = dir.as_ref().to_owned();
        std::fs::create_dir_all(&dir).expect("pki directory");
        let key = KeyPair::generate().expect("ca key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, "mesh test ca");
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let cert = params.self_signed(&key).expect("ca certificate");
        let ca_path = dir.join("ca.pem");
        write_atomic(&ca_path, cert.pem().as_bytes());
        Self { dir, ca_path, issuer: Issuer::new(params, key) }
    }

    /// The CA certificate (PEM), for `MESH_TLS_CA_FILE`.
    pub fn ca_path(&self) -> PathBuf {
        self.ca_path.clone()
    }

    /// Issues a certificate for `name` (DNS SANs `name` and `localhost`, IP
    /// SANs 127.0.0.1 and ::1, URI SAN `spiffe_id`; for both server and
    /// client use) with a fresh key, written to `<dir>/<name>.pem` and
    /// `<dir>/<name>-key.pem` (each replaced by a rename, as a rotation
    /// would). Issuing the same name again rotates it. Returns (cert, key).
    pub fn issue(&self, name: &str, spiffe_id: &str) -> (PathBuf, PathBuf) {
        let key = KeyPair::generate().expect("leaf key");
        let mut params =
            CertificateParams::new(vec![name.to_owned(), "localhost".to_owned()]).expect("leaf params");
        params.subject_alt_names.extend([
            SanType::IpAddress([127, 0, 0, 1].into()),
            SanType::IpAddress(std::net::Ipv6Addr::LOCALHOST.into()),
            SanType::URI(spiffe_id.try_into().expect("spiffe id is ASCII")),
        ]);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages =
            vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        self.sign_and_write(name, &params, &key)
    }

    /// Issues a certificate naming only the DNS name `dns` (subject CN and
    /// the sole SAN: no IP or URI SAN, so a peer reached by IP address fails
    /// host-name verification; `basicConstraints CA:FALSE`; for both server
    /// and client use) with a fresh key, written to `<dir>/<name>.pem` and
    /// `<dir>/<name>-key.pem` like [`Self::issue`]. For servers that are not
    /// the mesh's own (PostgreSQL, Redis). Returns (cert, key).
    pub fn issue_dns_only(&self, name: &str, dns: &str) -> (PathBuf, PathBuf) {
        let key = KeyPair::generate().expect("leaf key");
        let mut params = CertificateParams::new(vec![dns.to_owned()]).expect("leaf params");
        params.is_ca = IsCa::ExplicitNoCa;
        params.distinguished_name.push(DnType::CommonName, dns);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages =
            vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        self.sign_and_write(name, &params, &key)
    }

    /// Signs `params` with this CA and writes the certificate and `key` to
    /// `<dir>/<name>.pem` and `<dir>/<name>-key.pem`.
    fn sign_and_write(&self, name: &str, params: &CertificateParams, key: &KeyPair) -> (PathBuf, PathBuf) {
        let cert = params.signed_by(key, &self.issuer).expect("leaf certificate");
        let cert_path = self.dir.join(format!("{name}.pem"));
        let key_path = self.dir.join(format!("{name}-key.pem"));
        write_atomic(&cert_path, cert.pem().as_bytes());
        write_atomic(&key_path, key.serialize_pem().as_bytes());
        (cert_path, key_path)
    }

    /// Issues `name` (see [`Self::issue`]) and returns the configuration a
    /// process presenting it uses, reloading every 100 ms.
    pub fn tls_config(&self, name: &str, spiffe_id: &str) -> TlsConfig {
        let (cert, key) = self.issue(name, spiffe_id);
        TlsConfig {
            reload_interval: std::time::Duration::from_millis(100),
            ..TlsConfig::new(cert, key, self.ca_path())
        }
    }

    /// The `MESH_TLS_*` environment for a process presenting `name`
    /// (issued by [`Self::issue`]).
    pub fn env(&self, name: &str, spiffe_id: &str) -> Vec<(String, String)> {
        let (cert, key) = self.issue(name, spiffe_id);
        let path = |p: PathBuf| p.to_string_lossy().into_owned();
        vec![
            (mesh_runtime::tls::keys::CERT_FILE.to_owned(), path(cert)),
            (mesh_runtime::tls::keys::KEY_FILE.to_owned(), path(key)),
            (mesh_runtime::tls::keys::CA_FILE.to_owned(), path(self.ca_path())),
        ]
    }
}

impl TestPki {
    /// A channel to the TLS server at `addr`, presenting a certificate for
    /// `name` / `spiffe_id` (issued by [`Self::issue`]) and verifying the
    /// server as `localhost`; connected, so a refused handshake panics here.
    pub async fn channel(
        &self,
        name: &str,
        spiffe_id: &str,
        addr: std::net::SocketAddr,
    ) -> tonic::transport::Channel {
        let tls = self.tls_config(name, spiffe_id).load().expect("client tls loads");
        tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .expect("valid uri")
            .connect_with_connector(tls.connector("localhost").expect("server name"))
            .await
            .expect("tls connects")
    }
}

/// A lazily connecting channel to `addr` over mutual TLS, presenting
/// `tls`'s certificate and verifying the server as `127.0.0.1`. Call inside
/// a Tokio runtime.
pub fn channel(tls: &TlsConfig, addr: SocketAddr) -> Channel {
    let tls = tls.load().expect("client tls loads");
    endpoint(addr).connect_with_connector_lazy(tls.connector("127.0.0.1").expect("server name"))
}

/// A lazily connecting channel to `addr` over TLS that trusts `ca` but
/// presents no client certificate.
pub fn channel_without_certificate(ca: &Path, addr: SocketAddr) -> Channel {
    use tokio_rustls::rustls::{
        self,
        pki_types::{CertificateDer, ServerName, pem::PemObject},
    };
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).expect("ca file") {
        roots.add(c.expect("ca pem")).expect("ca cert");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("tls versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    endpoint(addr).connect_with_connector_lazy(tower_service_fn(move |uri: http::Uri| {
        let connector = connector.clone();
        async move {
            let port = uri.port_u16().unwrap_or(443);
            let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
            let name = ServerName::try_from("127.0.0.1").expect("ip name");
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(connector.connect(name, tcp).await?))
        }
    }))
}

/// A lazily connecting plaintext channel to `addr` (no wait for it to
/// answer, unlike [`crate::channel`]).
pub fn plaintext_channel(addr: SocketAddr) -> Channel {
    endpoint(addr).connect_lazy()
}

fn endpoint(addr: SocketAddr) -> Endpoint {
    Endpoint::from_shared(format!("http://{addr}"))
        .expect("valid uri")
        .connect_timeout(std::time::Duration::from_secs(2))
}

/// `tower::service_fn` without a tower dependency.
fn tower_service_fn<F, Fut, T>(f: F) -> ServiceFn<F>
where
    F: FnMut(http::Uri) -> Fut,
    Fut: Future<Output = Result<T, std::io::Error>>,
{
    ServiceFn(f)
}

#[derive(Clone)]
struct ServiceFn<F>(F);

impl<F, Fut, T> tonic::codegen::Service<http::Uri> for ServiceFn<F>
where
    F: FnMut(http::Uri) -> Fut,
    Fut: Future<Output = Result<T, std::io::Error>>,
{
    type Response = T;
    type Error = std::io::Error;
    type Future = Fut;

    fn poll_ready(&mut self, _cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Fut {
        (self.0)(uri)
    }
}

/// Writes `bytes` to `path` through a temporary file and a rename.
fn write_atomic(path: &Path, bytes: &[u8]) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).expect("write pem");
    std::fs::rename(&tmp, path).expect("rename pem");
}

/// Whether a call failed because the connection was refused at the
/// transport (a TLS handshake refused, or plaintext sent to a TLS port), not
/// answered by the service: tonic says UNAVAILABLE, UNKNOWN "transport
/// error" when the server closed it mid-call, or INTERNAL "h2 protocol
/// error" when the server's TLS alert (plaintext bytes `15 03 03 …`) arrived
/// first and was read as an HTTP/2 frame far over the size limit.
pub fn refused_by_transport(err: &tonic::Status) -> bool {
    match err.code() {
        tonic::Code::Unavailable => true,
        tonic::Code::Unknown => err.message().contains("transport error"),
        tonic::Code::Internal => err.message().contains("h2 protocol error"),
        _ => false,
    }
}
