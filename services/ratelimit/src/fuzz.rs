//! Entry points for the fuzz targets in `fuzz/` (not an API): each takes
//! arbitrary bytes, runs the code that parses untrusted input, and must
//! neither panic nor hang, whatever the bytes.

use prost::Message as _;
use tonic::Status;

/// Parses `bytes` (lossily as UTF-8) as a rules file holding YAML documents.
pub fn rules(bytes: &[u8]) {
    let text = String::from_utf8_lossy(bytes);
    let _ = crate::rules::parse_documents("fuzz.yaml", &text, &mut Default::default());
}

/// Decodes `bytes[1..]` as the request of the RPC `bytes[0]` picks and
/// validates it as the server does (the error mapped to a `Status` too).
pub fn request(bytes: &[u8]) {
    use mesh_proto::{envoy_rls, ratelimit as pb};
    let Some((which, body)) = bytes.split_first() else { return };
    let err = match which % 4 {
        0 => pb::CheckRequest::decode(body).ok().and_then(|r| crate::request::CheckCall::from_mesh(r).err()),
        1 => envoy_rls::RateLimitRequest::decode(body)
            .ok()
            .and_then(|r| crate::request::CheckCall::from_envoy(r).err()),
        2 => pb::ResetRequest::decode(body).ok().and_then(|r| crate::request::reset(r).err()),
        _ => pb::GetRulesRequest::decode(body).ok().and_then(|r| crate::request::get_rules(&r).err()),
    };
    if let Some(e) = err {
        let _ = Status::from(e);
    }
}
