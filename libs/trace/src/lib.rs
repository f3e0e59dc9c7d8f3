//! `mesh-trace`: a way to look at one request's trace without Docker or
//! Jaeger. [`sink`] is an OTLP/gRPC trace collector (the endpoint
//! `deploy/local/up.sh` points every service at) that appends each span it
//! receives to a file as one JSON line ([`SpanRecord`]); [`tree`] reads
//! that file back and prints one trace as a tree with durations.
//!
//! # Layout
//! - [`sink`]: the collector (`mesh-trace sink`).
//! - [`tree`]: picking a trace from the file and rendering it.

pub mod sink;
pub mod tree;

use serde::{Deserialize, Serialize};

/// One finished span as the sink stores it: one JSON object per line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SpanRecord {
    /// Trace id, 32 hex digits.
    pub trace_id: String,
    /// Span id, 16 hex digits.
    pub span_id: String,
    /// The parent's span id; empty for a root.
    #[serde(default)]
    pub parent_span_id: String,
    /// Span name.
    pub name: String,
    /// `service.name` of the process that exported it.
    #[serde(default)]
    pub service: String,
    /// `server`, `client`, `internal`, `producer`, `consumer` or `unspecified`.
    #[serde(default)]
    pub kind: String,
    /// Start, nanoseconds since the Unix epoch.
    pub start_unix_nano: u64,
    /// End, nanoseconds since the Unix epoch.
    pub end_unix_nano: u64,
    /// `ok`, `error` or `unset`.
    #[serde(default)]
    pub status: String,
    /// The status message of an error, if any.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub status_message: String,
    /// Attributes; values are JSON strings, numbers, booleans or arrays.
    #[serde(default)]
    pub attributes: serde_json::Map<String, serde_json::Value>,
}

impl SpanRecord {
    /// How long the span took, in nanoseconds.
    pub fn duration_nanos(&self) -> u64 {
        self.end_unix_nano.saturating_sub(self.start_unix_nano)
    }
}
