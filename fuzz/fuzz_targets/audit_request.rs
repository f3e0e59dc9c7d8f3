#![no_main]
//! `data[0]` picks the RPC, `data[1..]` is its request: decoded and
//! validated as the server does, the error mapped to a `Status` too.

use std::time::Duration;

use mesh_audit::domain;
use mesh_proto::audit as pb;
use prost::Message as _;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Some((which, body)) = data.split_first() else { return };
    let err = match which % 4 {
        0 => pb::AppendRequest::decode(body).ok().and_then(|r| {
            let now = chrono::DateTime::from_timestamp(1_800_000_000, 0).expect("a valid time");
            domain::parse_append(r, now, Duration::from_secs(300), &domain::CallContext::default()).err()
        }),
        1 => pb::QueryRequest::decode(body).ok().and_then(|r| domain::parse_query(r).err()),
        2 => pb::TailRequest::decode(body).ok().and_then(|r| domain::parse_filter(r.filter, "filter").err()),
        _ => pb::VerifyRequest::decode(body)
            .ok()
            .and_then(|r| domain::parse_range(r.from_sequence, r.to_sequence).err()),
    };
    if let Some(e) = err {
        let _ = tonic::Status::from(e);
    }
});
