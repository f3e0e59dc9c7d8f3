//! The opaque tokens the service hands out.
//!
//! - **Consistency token**: a WAL position of the primary taken after a
//!   write committed (`Db::current_lsn`). A read carrying it is served only
//!   where that position has been replayed. Format: base64url (no padding)
//!   of a version byte (1) and the position as 8 big-endian bytes. Anything
//!   else is INVALID_ARGUMENT; a well-formed token from the future only costs
//!   the bounded replica wait before the primary answers.
//! - **Page token**: where the next page of a Query starts. Format:
//!   base64url of a version byte (1), the first 16 bytes of SHA-256 over the
//!   collection and the filter's JSON (binding the token to its query), and
//!   the last key returned. A token from another query, or garbage, is
//!   INVALID_ARGUMENT.

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use mesh_db::Lsn;
use sha2::{Digest, Sha256};

const VERSION: u8 = 1;
const QUERY_HASH: usize = 16;

/// Longest page token accepted (a 256-byte key makes about 370 characters).
pub(crate) const MAX_PAGE_TOKEN: usize = 512;

/// The consistency token of a write at `lsn`.
pub(crate) fn consistency(lsn: Lsn) -> String {
    let mut b = [0u8; 9];
    b[0] = VERSION;
    b[1..].copy_from_slice(&lsn.0.to_be_bytes());
    URL_SAFE_NO_PAD.encode(b)
}

/// Parses a consistency token; `Ok(None)` for the empty string.
pub(crate) fn parse_consistency(t: &str) -> Result<Option<Lsn>, ()> {
    if t.is_empty() {
        return Ok(None);
    }
    let b = URL_SAFE_NO_PAD.decode(t).map_err(|_| ())?;
    match b.as_slice() {
        [VERSION, rest @ ..] if rest.len() == 8 => {
            Ok(Some(Lsn(u64::from_be_bytes(rest.try_into().expect("8 bytes")))))
        }
        _ => Err(()),
    }
}

/// What binds a page token to its query.
pub(crate) fn query_hash(collection: &str, filter_json: Option<&str>) -> [u8; QUERY_HASH] {
    let mut h = Sha256::new();
    h.update((collection.len() as u64).to_be_bytes());
    h.update(collection.as_bytes());
    h.update(filter_json.unwrap_or("").as_bytes());
    h.finalize()[..QUERY_HASH].try_into().expect("16 bytes")
}

/// The page token after `last_key`.
pub(crate) fn page(query: &[u8; QUERY_HASH], last_key: &str) -> String {
    let mut b = Vec::with_capacity(1 + QUERY_HASH + last_key.len());
    b.push(VERSION);
    b.extend_from_slice(query);
    b.extend_from_slice(last_key.as_bytes());
    URL_SAFE_NO_PAD.encode(b)
}

/// Why a page token was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PageTokenError {
    /// Not a token of this service.
    Malformed,
    /// A token of another query (collection or filter).
    OtherQuery,
}

/// The key after which the page starts; `Ok(None)` for the empty string.
pub(crate) fn parse_page(t: &str, query: &[u8; QUERY_HASH]) -> Result<Option<String>, PageTokenError> {
    if t.is_empty() {
        return Ok(None);
    }
    if t.len() > MAX_PAGE_TOKEN {
        return Err(PageTokenError::Malformed);
    }
    let b = URL_SAFE_NO_PAD.decode(t).map_err(|_| PageTokenError::Malformed)?;
    if b.len() <= 1 + QUERY_HASH || b[0] != VERSION {
        return Err(PageTokenError::Malformed);
    }
    if b[1..=QUERY_HASH] != query[..] {
        return Err(PageTokenError::OtherQuery);
    }
    let key = String::from_utf8(b[1 + QUERY_HASH..].to_vec()).map_err(|_| PageTokenError::Malformed)?;
    // Only keys a document can have (a forged token could hold anything).
    if key.len() > crate::request::MAX_NAME || key.contains('\0') {
        return Err(PageTokenError::Malformed);
    }
    Ok(Some(key))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consistency_tokens_round_trip_and_refuse_garbage() {
        let lsn = Lsn(0x16_B374_D848);
        let t = consistency(lsn);
        assert_eq!(parse_consistency(&t), Ok(Some(lsn)));
        assert_eq!(parse_consistency(""), Ok(None));
        for bad in ["x", "AQ", "!!!!", &consistency(lsn)[..10], "AgAAABazdNhI"] {
            assert_eq!(parse_consistency(bad), Err(()), "{bad}");
        }
    }

    #[test]
    fn page_tokens_are_bound_to_their_query() {
        let q = query_hash("orders", Some(r#"{"status":"open"}"#));
        let t = page(&q, "o-17/ü");
        assert_eq!(parse_page(&t, &q), Ok(Some("o-17/ü".to_owned())));
        let other_filter = query_hash("orders", Some(r#"{"status":"done"}"#));
        assert_eq!(parse_page(&t, &other_filter), Err(PageTokenError::OtherQuery));
        let other_collection = query_hash("order", Some(r#"s{"status":"open"}"#));
        assert_eq!(parse_page(&t, &other_collection), Err(PageTokenError::OtherQuery));
        let nul = page(&q, "a\0b");
        let long = page(&q, &"k".repeat(crate::request::MAX_NAME + 1));
        for bad in ["garbage!", "AQ", &"A".repeat(MAX_PAGE_TOKEN + 1), &nul, &long] {
            assert_eq!(parse_page(bad, &q), Err(PageTokenError::Malformed), "{bad}");
        }
        assert_eq!(parse_page("", &q), Ok(None));
    }
}
