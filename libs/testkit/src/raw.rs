//! Raw gRPC calls, for bad-input tests: a request's bytes exactly as the
//! test wrote them (a string field that is not UTF-8, bytes where a message
//! is expected, nesting no typed client would build) and headers no tonic
//! client sends as given (`grpc-timeout: 0n`). One unary call per HTTP/2
//! connection, no retries, no client-side deadline.

use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tonic::{Code, Status};

/// Sends one unary call to `path` (`/mesh.data.v1.DataService/Put`) on
/// `addr` with `message` as the request message's bytes (framed as one
/// uncompressed gRPC message) and `headers` added as they are. Returns the
/// response message's bytes, or the status the server answered (transport
/// failures as UNAVAILABLE).
pub async fn unary(
    addr: SocketAddr,
    path: &str,
    message: &[u8],
    headers: &[(&str, &str)],
) -> Result<Bytes, Status> {
    let unavailable = |what: &str, e: &dyn std::fmt::Display| Status::unavailable(format!("{what}: {e}"));
    let tcp = tokio::net::TcpStream::connect(addr).await.map_err(|e| unavailable("connect", &e))?;
    let (mut sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
        .await
        .map_err(|e| unavailable("handshake", &e))?;
    tokio::spawn(conn);
    let len = u32::try_from(message.len()).expect("a message under 4 GiB");
    let mut frame = Vec::with_capacity(5 + message.len());
    frame.push(0);
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(message);
    let mut req = http::Request::post(format!("http://{addr}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Full::new(Bytes::from(frame))).expect("a valid request");
    let resp = sender.send_request(req).await.map_err(|e| unavailable("send", &e))?;
    let (parts, body) = resp.into_parts();
    if let Some(s) = Status::from_header_map(&parts.headers)
        && s.code() != Code::Ok
    {
        return Err(s);
    }
    let body = body.collect().await.map_err(|e| unavailable("response body", &e))?;
    if let Some(s) = body.trailers().and_then(Status::from_header_map)
        && s.code() != Code::Ok
    {
        return Err(s);
    }
    let data = body.to_bytes();
    let n = data.get(1..5).map(|b| u32::from_be_bytes(b.try_into().expect("4 bytes")) as usize);
    match n {
        Some(n) if data.len() >= 5 + n => Ok(data.slice(5..5 + n)),
        _ => Err(Status::internal(format!("no response message in {} bytes", data.len()))),
    }
}

/// A protobuf message written field by field, valid or not: for requests
/// a typed message cannot express.
#[derive(Debug, Clone, Default)]
pub struct Wire(Vec<u8>);

impl Wire {
    /// An empty message.
    pub fn new() -> Self {
        Self::default()
    }

    fn varint(&mut self, mut n: u64) {
        loop {
            let b = (n & 0x7f) as u8;
            n >>= 7;
            if n == 0 {
                self.0.push(b);
                return;
            }
            self.0.push(b | 0x80);
        }
    }

    /// Field `field` as length-delimited `bytes` (a string, bytes or a
    /// nested message on the wire).
    pub fn bytes(mut self, field: u32, bytes: &[u8]) -> Self {
        self.varint(u64::from(field) << 3 | 2);
        self.varint(bytes.len() as u64);
        self.0.extend_from_slice(bytes);
        self
    }

    /// Field `field` as a nested message.
    pub fn message(self, field: u32, m: &Wire) -> Self {
        self.bytes(field, &m.0)
    }

    /// Field `field` as a varint (ints, bools, enums).
    pub fn varint_field(mut self, field: u32, n: u64) -> Self {
        self.varint(u64::from(field) << 3);
        self.varint(n);
        self
    }

    /// The encoded message.
    pub fn encode(&self) -> &[u8] {
        &self.0
    }

    /// A `google.protobuf.Struct` `{"<key>": {"<key>": ... {}}}` nested
    /// `depth` objects deep (past prost's decoding recursion limit of 100
    /// levels from about 33 objects, as each object is three messages).
    pub fn nested_struct(key: &str, depth: usize) -> Wire {
        let mut s = Wire::new();
        for _ in 0..depth {
            // Struct.fields (map entry: 1 key, 2 Value), Value.struct_value = 5.
            let value = Wire::new().message(5, &s);
            let entry = Wire::new().bytes(1, key.as_bytes()).message(2, &value);
            s = Wire::new().message(1, &entry);
        }
        s
    }
}
