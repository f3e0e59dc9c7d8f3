//! Entry points for the fuzz targets in `fuzz/` (not an API): each takes
//! arbitrary bytes, runs the code that parses untrusted input, and must
//! neither panic nor hang, whatever the bytes.

use prost::Message as _;
use tonic::Status;

use crate::token;

/// Decodes `bytes[1..]` as the request of the RPC `bytes[0]` picks and
/// validates it as the server does (the error mapped to a `Status` too).
pub fn request(bytes: &[u8]) {
    use mesh_proto::data as pb;
    let Some((which, body)) = bytes.split_first() else { return };
    let err = match which % 5 {
        0 => pb::PutRequest::decode(body).ok().and_then(|r| crate::request::put(r).err()),
        1 => pb::DeleteRequest::decode(body).ok().and_then(|r| crate::request::delete(r).err()),
        2 => pb::BatchRequest::decode(body)
            .ok()
            .and_then(|r| crate::request::batch(r, crate::DataConfig::default().max_batch_ops).err()),
        3 => pb::GetRequest::decode(body).ok().and_then(|r| crate::request::get(r).err()),
        _ => pb::QueryRequest::decode(body).ok().and_then(|r| crate::request::query(r).err()),
    };
    if let Some(e) = err {
        let _ = Status::from(e);
    }
}

/// Parses `bytes` (lossily as UTF-8) as a consistency token and as a page
/// token (for a fixed query, and for the query the token itself names, so
/// the key checks after the binding are reached too).
pub fn tokens(bytes: &[u8]) {
    let text = String::from_utf8_lossy(bytes);
    let _ = token::parse_consistency(&text);
    let q = token::query_hash("fuzz", None);
    let _ = token::parse_page(&text, &q);
    // A token carrying the right binding: the first 16 bytes name it.
    if bytes.len() >= 16 {
        let q: [u8; 16] = bytes[..16].try_into().expect("16 bytes");
        let t = token::page(&q, &String::from_utf8_lossy(&bytes[16..]));
        let _ = token::parse_page(&t, &q);
    }
}
