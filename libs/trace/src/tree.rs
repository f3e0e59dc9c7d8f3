//! Reading the sink's file back: which traces it holds, and one trace as a
//! tree, children under their parent in start order, each line with the
//! span's service, duration and its offset from the start of the trace.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fmt::Write as _,
    io::BufRead as _,
    path::Path,
};

use anyhow::Context as _;

use crate::{SpanRecord, sink::rotated};

/// Every span in the sink's file (and its rotated predecessor, so a trace
/// cut by a rotation is whole). Lines that do not parse (a line still being
/// written) are skipped.
///
/// # Errors
/// Neither file can be read.
pub fn load(path: &Path) -> anyhow::Result<Vec<SpanRecord>> {
    let mut spans = Vec::new();
    let mut found = false;
    for p in [rotated(path), path.to_owned()] {
        let file = match std::fs::File::open(&p) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e).with_context(|| format!("reading {}", p.display())),
        };
        found = true;
        for line in std::io::BufReader::new(file).lines() {
            if let Ok(span) = serde_json::from_str::<SpanRecord>(&line?) {
                spans.push(span);
            }
        }
    }
    anyhow::ensure!(found, "no trace file at {}", path.display());
    Ok(spans)
}

/// A trace in the file: its id, its first root's name and service, its
/// span count and how long it took from first start to last end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceSummary {
    /// Trace id.
    pub trace_id: String,
    /// `service: name` of the earliest span without a parent in the file.
    pub root: String,
    /// Spans in the file.
    pub spans: usize,
    /// First start, ns since the epoch.
    pub start_unix_nano: u64,
    /// Last end minus first start, ns.
    pub duration_nanos: u64,
}

/// Every trace in `spans`, oldest first.
pub fn traces(spans: &[SpanRecord]) -> Vec<TraceSummary> {
    let mut by_trace: BTreeMap<&str, Vec<&SpanRecord>> = BTreeMap::new();
    for s in spans {
        by_trace.entry(&s.trace_id).or_default().push(s);
    }
    let mut out: Vec<TraceSummary> = by_trace
        .into_iter()
        .map(|(id, spans)| {
            let ids: HashSet<&str> = spans.iter().map(|s| s.span_id.as_str()).collect();
            let start = spans.iter().map(|s| s.start_unix_nano).min().unwrap_or(0);
            let end = spans.iter().map(|s| s.end_unix_nano).max().unwrap_or(0);
            let root = spans
                .iter()
                .filter(|s| !ids.contains(s.parent_span_id.as_str()))
                .min_by_key(|s| s.start_unix_nano)
                .map(|s| format!("{}: {}", s.service, s.name))
                .unwrap_or_default();
            TraceSummary {
                trace_id: id.to_owned(),
                root,
                spans: spans.len(),
                start_unix_nano: start,
                duration_nanos: end.saturating_sub(start),
            }
        })
        .collect();
    out.sort_by_key(|t| t.start_unix_nano);
    out
}

/// The id of the trace that started last.
pub fn last(spans: &[SpanRecord]) -> Option<String> {
    traces(spans).pop().map(|t| t.trace_id)
}

fn millis(nanos: u64) -> String {
    format!("{:.3} ms", nanos as f64 / 1e6)
}

/// The trace id in `arg`: the argument itself, or the second field of a W3C
/// `traceparent` / `traceresponse` value (`00-<trace id>-<span id>-<flags>`).
pub fn trace_id_of(arg: &str) -> String {
    let arg = arg.trim();
    match arg.split('-').collect::<Vec<_>>()[..] {
        [_, id, _, _] if id.len() == 32 => id.to_ascii_lowercase(),
        _ => arg.to_ascii_lowercase(),
    }
}

/// Trace `trace_id` as a tree: a header line, then one line per span,
/// `name  [service kind]  duration  +offset` and, when present, the
/// server it called (`server.address:server.port`) and an error status.
/// Spans whose parent is not in the file (a caller outside the mesh, or a
/// span not exported yet) are shown as roots. `None` if the file holds no
/// span of that trace.
pub fn render(spans: &[SpanRecord], trace_id: &str) -> Option<String> {
    let trace_id = trace_id.trim().to_ascii_lowercase();
    let mine: Vec<&SpanRecord> = spans.iter().filter(|s| s.trace_id == trace_id).collect();
    if mine.is_empty() {
        return None;
    }
    let ids: HashSet<&str> = mine.iter().map(|s| s.span_id.as_str()).collect();
    let mut children: HashMap<&str, Vec<&SpanRecord>> = HashMap::new();
    let mut roots = Vec::new();
    for s in &mine {
        if ids.contains(s.parent_span_id.as_str()) && s.parent_span_id != s.span_id {
            children.entry(s.parent_span_id.as_str()).or_default().push(s);
        } else {
            roots.push(*s);
        }
    }
    for v in children.values_mut() {
        v.sort_by_key(|s| (s.start_unix_nano, s.end_unix_nano));
    }
    roots.sort_by_key(|s| s.start_unix_nano);
    let start = mine.iter().map(|s| s.start_unix_nano).min().unwrap_or(0);
    let end = mine.iter().map(|s| s.end_unix_nano).max().unwrap_or(0);
    let mut out = format!("trace {trace_id}  {} spans  {}\n", mine.len(), millis(end.saturating_sub(start)));
    // (span, prefix of its line, last of its siblings, a root)
    let mut stack: Vec<(&SpanRecord, String, bool, bool)> =
        roots.iter().rev().map(|s| (*s, String::new(), true, true)).collect();
    let mut seen = HashSet::new();
    while let Some((s, prefix, is_last, root)) = stack.pop() {
        if !seen.insert(s.span_id.as_str()) {
            continue;
        }
        let branch = match (root, is_last) {
            (true, _) => "",
            (false, true) => "└─ ",
            (false, false) => "├─ ",
        };
        let _ = write!(
            out,
            "{prefix}{branch}{}  [{} {}]  {}  +{}",
            s.name,
            s.service,
            s.kind,
            millis(s.duration_nanos()),
            millis(s.start_unix_nano.saturating_sub(start)),
        );
        if let Some(addr) = s.attributes.get("server.address").and_then(|v| v.as_str()) {
            let _ = write!(out, "  {addr}");
            if let Some(port) = s.attributes.get("server.port") {
                let _ = write!(out, ":{port}");
            }
        }
        if s.status == "error" {
            let _ = write!(out, "  ERROR {}", s.status_message);
        }
        out.push('\n');
        let child_prefix = match (root, is_last) {
            (true, _) => prefix.clone(),
            (false, true) => format!("{prefix}   "),
            (false, false) => format!("{prefix}│  "),
        };
        if let Some(kids) = children.get(s.span_id.as_str()) {
            for (i, k) in kids.iter().enumerate().rev() {
                stack.push((*k, child_prefix.clone(), i == kids.len() - 1, false));
            }
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span(id: &str, parent: &str, name: &str, service: &str, start_us: u64, end_us: u64) -> SpanRecord {
        SpanRecord {
            trace_id: "ab".repeat(16),
            span_id: id.to_owned(),
            parent_span_id: parent.to_owned(),
            name: name.to_owned(),
            service: service.to_owned(),
            kind: "server".to_owned(),
            start_unix_nano: start_us * 1000,
            end_unix_nano: end_us * 1000,
            status: "unset".to_owned(),
            status_message: String::new(),
            attributes: serde_json::Map::new(),
        }
    }

    #[test]
    fn a_trace_prints_as_a_tree_in_start_order_with_durations_and_offsets() {
        let mut redis = span("03", "01", "EVALSHA ratelimit_check", "rl", 1_500, 2_000);
        redis.kind = "client".into();
        redis.attributes.insert("server.address".into(), "127.0.0.1".into());
        redis.attributes.insert("server.port".into(), 7001.into());
        let mut failed = span("04", "02", "SELECT t", "data", 3_000, 3_250);
        failed.status = "error".into();
        failed.status_message = "boom".into();
        let mut other = span("09", "", "other", "x", 0, 1);
        other.trace_id = "cd".repeat(16);
        let spans = vec![
            failed,
            span("02", "01", "GET", "rl", 2_500, 4_000),
            redis,
            span("01", "ff", "Check", "rl", 1_000, 5_000),
            other,
        ];
        let text = render(&spans, &"AB".repeat(16)).unwrap();
        let want = format!(
            "trace {}  4 spans  4.000 ms\n\
             Check  [rl server]  4.000 ms  +0.000 ms\n\
             ├─ EVALSHA ratelimit_check  [rl client]  0.500 ms  +0.500 ms  127.0.0.1:7001\n\
             └─ GET  [rl server]  1.500 ms  +1.500 ms\n   \
             └─ SELECT t  [data server]  0.250 ms  +2.000 ms  ERROR boom\n",
            "ab".repeat(16)
        );
        assert_eq!(text, want, "\n{text}");
        assert!(render(&spans, &"00".repeat(16)).is_none());
    }

    #[test]
    fn a_traceresponse_names_its_trace() {
        let id = "4bf92f3577b34da6a3ce929d0e0e4736";
        assert_eq!(trace_id_of(&format!("00-{id}-00f067aa0ba902b7-01")), id);
        assert_eq!(trace_id_of(&format!(" {} ", id.to_uppercase())), id);
    }

    #[test]
    fn the_last_trace_is_the_one_that_started_last() {
        let a = span("01", "", "first", "s", 10, 100);
        let mut b = span("02", "", "second", "s", 50, 60);
        b.trace_id = "cd".repeat(16);
        let spans = vec![b.clone(), a];
        assert_eq!(last(&spans).as_deref(), Some(b.trace_id.as_str()));
        let t = traces(&spans);
        assert_eq!(t[0].root, "s: first");
        assert_eq!((t[1].spans, t[1].duration_nanos), (1, 10_000));
        assert_eq!(last(&[]), None);
    }
}
