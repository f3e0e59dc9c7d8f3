//! Who is calling: the identity a caller proved with its TLS client
//! certificate. When the server runs with TLS (see [`crate::tls`]), every
//! request from a caller whose certificate chains to `MESH_TLS_CA_FILE`
//! carries a [`CallerIdentity`] in its extensions: the first URI SAN of the
//! caller's leaf certificate that starts with `spiffe://`. Without TLS, or
//! when the certificate has no such SAN, there is none.

/// The caller's identity, e.g. `spiffe://mesh.local/ns/default/sa/data`:
/// the first `spiffe://` URI SAN of its verified leaf certificate.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CallerIdentity(pub String);

impl CallerIdentity {
    /// The identity as a string (a SPIFFE URI).
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for CallerIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The verified identity of the caller of `req`: `None` without TLS or when
/// its certificate names no `spiffe://` URI.
pub fn caller<T>(req: &tonic::Request<T>) -> Option<&CallerIdentity> {
    req.extensions().get::<CallerIdentity>()
}
