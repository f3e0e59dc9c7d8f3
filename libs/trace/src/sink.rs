//! The collector: OTLP/gRPC `TraceService/Export`, each span appended to a
//! file as one JSON line. When the file passes `max_bytes` it is renamed to
//! `<file>.1` (replacing the previous one) and a new file is started, so
//! the sink never holds more than about twice `max_bytes` on disk.

use std::{
    fs::{File, OpenOptions},
    io::Write as _,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use anyhow::Context as _;
use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
        trace_service_server::{TraceService, TraceServiceServer},
    },
    common::v1::{AnyValue, KeyValue, any_value::Value},
    trace::v1::{span::SpanKind, status::StatusCode},
};
use serde_json::Value as Json;
use tokio_stream::wrappers::TcpListenerStream;

use crate::SpanRecord;

/// File size (bytes) at which the sink starts a new file by default.
pub const DEFAULT_MAX_BYTES: u64 = 64 * 1024 * 1024;

/// The file a rotated trace file is kept in: `<file>.1`.
pub fn rotated(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".1");
    PathBuf::from(name)
}

#[derive(Debug)]
struct Out {
    path: PathBuf,
    file: File,
    written: u64,
    max_bytes: u64,
}

impl Out {
    fn open(path: &Path, max_bytes: u64) -> std::io::Result<Self> {
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        let written = file.metadata()?.len();
        Ok(Self { path: path.to_owned(), file, written, max_bytes })
    }

    fn append(&mut self, lines: &[u8]) -> std::io::Result<()> {
        if self.written > 0 && self.written + lines.len() as u64 > self.max_bytes {
            std::fs::rename(&self.path, rotated(&self.path))?;
            *self = Self::open(&self.path, self.max_bytes)?;
        }
        self.file.write_all(lines)?;
        self.written += lines.len() as u64;
        Ok(())
    }
}

#[derive(Debug, Clone)]
struct Sink {
    out: Arc<Mutex<Out>>,
}

fn json(v: Option<&AnyValue>) -> Json {
    match v.and_then(|v| v.value.as_ref()) {
        Some(Value::StringValue(s)) => s.clone().into(),
        Some(Value::IntValue(i)) => (*i).into(),
        Some(Value::BoolValue(b)) => (*b).into(),
        Some(Value::DoubleValue(d)) => serde_json::json!(d),
        Some(Value::ArrayValue(a)) => Json::Array(a.values.iter().map(|v| json(Some(v))).collect()),
        Some(Value::KvlistValue(kv)) => Json::Object(attributes(&kv.values)),
        Some(Value::BytesValue(b)) => b.iter().map(|x| format!("{x:02x}")).collect::<String>().into(),
        Some(Value::StringValueStrindex(_)) | None => Json::Null,
    }
}

fn attributes(kvs: &[KeyValue]) -> serde_json::Map<String, Json> {
    kvs.iter().map(|kv| (kv.key.clone(), json(kv.value.as_ref()))).collect()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The spans of one export request, flattened with their `service.name`.
pub fn records(req: ExportTraceServiceRequest) -> Vec<SpanRecord> {
    let mut out = Vec::new();
    for rs in req.resource_spans {
        let resource = rs.resource.map(|r| attributes(&r.attributes)).unwrap_or_default();
        let service = resource.get("service.name").and_then(Json::as_str).unwrap_or_default().to_owned();
        for s in rs.scope_spans.into_iter().flat_map(|ss| ss.spans) {
            let kind = match SpanKind::try_from(s.kind).unwrap_or(SpanKind::Unspecified) {
                SpanKind::Server => "server",
                SpanKind::Client => "client",
                SpanKind::Internal => "internal",
                SpanKind::Producer => "producer",
                SpanKind::Consumer => "consumer",
                SpanKind::Unspecified => "unspecified",
            };
            let (status, status_message) = match &s.status {
                Some(st) => (
                    match StatusCode::try_from(st.code).unwrap_or(StatusCode::Unset) {
                        StatusCode::Ok => "ok",
                        StatusCode::Error => "error",
                        StatusCode::Unset => "unset",
                    },
                    st.message.clone(),
                ),
                None => ("unset", String::new()),
            };
            out.push(SpanRecord {
                trace_id: hex(&s.trace_id),
                span_id: hex(&s.span_id),
                parent_span_id: hex(&s.parent_span_id),
                name: s.name,
                service: service.clone(),
                kind: kind.to_owned(),
                start_unix_nano: s.start_time_unix_nano,
                end_unix_nano: s.end_time_unix_nano,
                status: status.to_owned(),
                status_message,
                attributes: attributes(&s.attributes),
            });
        }
    }
    out
}

#[tonic::async_trait]
impl TraceService for Sink {
    async fn export(
        &self,
        req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut lines = Vec::new();
        for r in records(req.into_inner()) {
            serde_json::to_writer(&mut lines, &r).map_err(|e| tonic::Status::internal(e.to_string()))?;
            lines.push(b'\n');
        }
        let mut out = self.out.lock().map_err(|_| tonic::Status::internal("sink poisoned"))?;
        out.append(&lines).map_err(|e| tonic::Status::unavailable(format!("cannot write spans: {e}")))?;
        Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

/// Serves OTLP/gRPC trace export on `listener`, appending spans to `path`,
/// until `shutdown` resolves.
///
/// # Errors
/// The file cannot be opened, or the server fails.
pub async fn serve(
    listener: tokio::net::TcpListener,
    path: &Path,
    max_bytes: u64,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    let out = Out::open(path, max_bytes).with_context(|| format!("opening {}", path.display()))?;
    let sink = Sink { out: Arc::new(Mutex::new(out)) };
    tonic::transport::Server::builder()
        .add_service(TraceServiceServer::new(sink))
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
        .await?;
    Ok(())
}

/// Binds `addr` (port 0: any free port) for [`serve`].
///
/// # Errors
/// The address cannot be bound.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await.with_context(|| format!("binding {addr}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(id: u64) -> Vec<u8> {
        let r = SpanRecord {
            trace_id: format!("{id:032x}"),
            span_id: format!("{id:016x}"),
            parent_span_id: String::new(),
            name: "n".into(),
            service: "s".into(),
            kind: "server".into(),
            start_unix_nano: id,
            end_unix_nano: id + 1,
            status: "unset".into(),
            status_message: String::new(),
            attributes: serde_json::Map::new(),
        };
        let mut b = serde_json::to_vec(&r).unwrap();
        b.push(b'\n');
        b
    }

    #[test]
    fn a_full_file_is_rotated_once_and_both_are_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("traces.jsonl");
        let size = line(1).len() as u64;
        let mut out = Out::open(&path, 2 * size).unwrap();
        for id in 1..=5 {
            out.append(&line(id)).unwrap();
        }
        // 1 2 | 3 4 | 5: the oldest pair is gone, never more than 2 files.
        let kept: Vec<u64> = crate::tree::load(&path).unwrap().iter().map(|s| s.start_unix_nano).collect();
        assert_eq!(kept, vec![3, 4, 5]);
        assert!(std::fs::metadata(&path).unwrap().len() <= 2 * size);
        assert!(std::fs::metadata(rotated(&path)).unwrap().len() <= 2 * size);
        // Reopened (a restarted sink), it appends.
        drop(out);
        Out::open(&path, 2 * size).unwrap().append(&line(6)).unwrap();
        let kept: Vec<u64> = crate::tree::load(&path).unwrap().iter().map(|s| s.start_unix_nano).collect();
        assert_eq!(kept, vec![3, 4, 5, 6]);
    }
}
