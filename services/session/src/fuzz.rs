//! Entry points for the fuzz targets in `fuzz/` (not an API): each takes
//! arbitrary bytes, runs the code that parses untrusted input, and must
//! neither panic nor hang, whatever the bytes.

use prost::Message as _;
use tonic::Status;

use crate::{
    config::SessionConfig,
    token::{SessionId, Token},
};

/// Parses `bytes` (lossily as UTF-8) as a presented token and a session id.
pub fn token(bytes: &[u8]) {
    let text = String::from_utf8_lossy(bytes);
    let _ = Token::parse(&text);
    let _ = SessionId::parse(&text);
}

/// Decodes `bytes[1..]` as the request of the RPC `bytes[0]` picks and
/// validates it as the server does (the error mapped to a `Status` too).
pub fn request(bytes: &[u8]) {
    use mesh_proto::session as pb;
    let Some((which, body)) = bytes.split_first() else { return };
    let err = match which % 6 {
        0 => pb::CreateSessionRequest::decode(body)
            .ok()
            .and_then(|r| crate::request::create(r, &SessionConfig::default()).err()),
        1 => {
            pb::ValidateSessionRequest::decode(body).ok().and_then(|r| crate::request::token(&r.token).err())
        }
        2 => pb::RefreshSessionRequest::decode(body).ok().and_then(|r| crate::request::refresh(r).err()),
        3 => pb::RevokeSessionRequest::decode(body).ok().and_then(|r| crate::request::revoke(r).err()),
        4 => pb::RevokeUserSessionsRequest::decode(body)
            .ok()
            .and_then(|r| crate::request::revoke_user(r).err()),
        _ => pb::ListUserSessionsRequest::decode(body).ok().and_then(|r| crate::request::list(r).err()),
    };
    if let Some(e) = err {
        let _ = Status::from(e);
    }
}
