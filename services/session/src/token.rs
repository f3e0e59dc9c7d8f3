//! Tokens, session ids and the bucket both carry.
//!
//! # Buckets
//! Every user belongs to one of [`BUCKETS`] buckets, derived from a hash of
//! the user id. A bucket is a Redis Cluster hash tag (`{session:3f2}`): the
//! user's sessions, the pointers from token hashes to them, the user's index,
//! the audit outbox and the invalidation channel of the bucket all live in
//! one slot, so every change is one atomic script. The bucket count is part
//! of the storage format: changing it orphans existing sessions.
//!
//! # Tokens
//! `msess_<bucket>_<secret><check>`: `msess_` so secret scanners and people
//! recognise it; the bucket as three hex digits (a routing hint, 10 bits of a
//! hash of the user id, not the user id), so validation goes to the right
//! slot in one round trip; 256 bits from the OS CSPRNG as 43 base64url
//! characters; six base64url characters of SHA-256 over everything before
//! them, so a mistyped or made-up token is refused without asking Redis.
//! Only SHA-256 of the whole token is stored. [`Token`] never prints itself.
//!
//! # Session ids
//! `ses_<bucket>_<22 base64url characters>` (128 random bits): not secret,
//! but routable, so revoking by id is one round trip too.

use std::fmt;

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use hmac::{Hmac, Mac};
use rand::{TryRngCore, rngs::OsRng};
use sha2::{Digest, Sha256};

/// How many buckets users are spread over (a storage-format constant).
pub const BUCKETS: u16 = 1024;

/// What every token starts with.
pub const TOKEN_PREFIX: &str = "msess_";
const SESSION_PREFIX: &str = "ses_";
const SECRET_LEN: usize = 43; // 32 bytes, base64url without padding
const CHECK_LEN: usize = 6;
const HINT_LEN: usize = 3;
/// Length of every token.
pub const TOKEN_LEN: usize = TOKEN_PREFIX.len() + HINT_LEN + 1 + SECRET_LEN + CHECK_LEN;
const SESSION_RANDOM_LEN: usize = 22; // 16 bytes
const SESSION_ID_LEN: usize = SESSION_PREFIX.len() + HINT_LEN + 1 + SESSION_RANDOM_LEN;

/// A user's bucket: a Redis Cluster hash tag shared by everything of the user.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Bucket(u16);

impl Bucket {
    /// The bucket of a user.
    pub fn of_user(user_id: &str) -> Self {
        let d = Sha256::digest(user_id.as_bytes());
        Self(u16::from_be_bytes([d[0], d[1]]) % BUCKETS)
    }

    /// Bucket number `n` (`n < BUCKETS`).
    pub fn new(n: u16) -> Option<Self> {
        (n < BUCKETS).then_some(Self(n))
    }

    /// Every bucket.
    pub fn all() -> impl Iterator<Item = Self> {
        (0..BUCKETS).map(Self)
    }

    /// The three hex digits tokens and session ids carry.
    pub fn hint(self) -> String {
        format!("{:03x}", self.0)
    }

    fn parse_hint(s: &str) -> Option<Self> {
        if s.len() != HINT_LEN || !s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
            return None;
        }
        Self::new(u16::from_str_radix(s, 16).ok()?)
    }

    /// The key base of the bucket under `prefix`: `<prefix>{session:<hint>}:`.
    pub fn base(self, prefix: &str) -> String {
        format!("{prefix}{{session:{}}}:", self.hint())
    }

    /// The bucket whose key base is a prefix of `key` (e.g. a channel name).
    pub fn from_key(prefix: &str, key: &str) -> Option<Self> {
        let rest = key.strip_prefix(prefix)?.strip_prefix("{session:")?;
        Self::parse_hint(rest.get(..HINT_LEN)?).filter(|_| rest[HINT_LEN..].starts_with("}:"))
    }
}

fn random<const N: usize>() -> [u8; N] {
    let mut bytes = [0u8; N];
    // The OS generator failing is not something a service can work around.
    OsRng.try_fill_bytes(&mut bytes).expect("the OS random number generator works");
    bytes
}

/// SHA-256 of a token: what Redis stores and looks up.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct TokenHash(pub [u8; 32]);

impl TokenHash {
    /// Lowercase hex, as used in keys.
    pub fn hex(&self) -> String {
        hex::encode(self.0)
    }

    /// From the hex form.
    pub fn from_hex(s: &str) -> Option<Self> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).ok()?;
        Some(Self(out))
    }
}

impl fmt::Debug for TokenHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Not a secret, but a lookup key: keep it out of debug output too.
        f.write_str("TokenHash(..)")
    }
}

/// A session token. Shown to the caller once; never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(String);

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(..)")
    }
}

fn check(body: &str) -> String {
    let mut s = URL_SAFE_NO_PAD.encode(Sha256::digest(body.as_bytes()));
    s.truncate(CHECK_LEN);
    s
}

fn is_b64url(s: &str) -> bool {
    s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

impl Token {
    /// A new token routed to `bucket`.
    pub fn generate(bucket: Bucket) -> Self {
        let body = format!("{TOKEN_PREFIX}{}_{}", bucket.hint(), URL_SAFE_NO_PAD.encode(random::<32>()));
        let check = check(&body);
        Self(body + &check)
    }

    /// The token text, for the response that hands it out.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Its hash.
    pub fn hash(&self) -> TokenHash {
        TokenHash(Sha256::digest(self.0.as_bytes()).into())
    }

    /// Parses a presented token: its bucket and hash, or `None` when it
    /// cannot be one of ours (wrong shape or checksum).
    pub fn parse(s: &str) -> Option<(Bucket, TokenHash)> {
        if s.len() != TOKEN_LEN || !s.is_ascii() {
            return None;
        }
        let rest = s.strip_prefix(TOKEN_PREFIX)?;
        let bucket = Bucket::parse_hint(&rest[..HINT_LEN])?;
        if rest.as_bytes()[HINT_LEN] != b'_' {
            return None;
        }
        let secret = &rest[HINT_LEN + 1..HINT_LEN + 1 + SECRET_LEN];
        let (body, sum) = s.split_at(TOKEN_LEN - CHECK_LEN);
        if !is_b64url(secret) || check(body) != sum {
            return None;
        }
        Some((bucket, TokenHash(Sha256::digest(s.as_bytes()).into())))
    }
}

/// A session id (not secret; routable to its bucket).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SessionId(String);

impl SessionId {
    /// A new id in `bucket`.
    pub fn generate(bucket: Bucket) -> Self {
        Self(format!("{SESSION_PREFIX}{}_{}", bucket.hint(), URL_SAFE_NO_PAD.encode(random::<16>())))
    }

    /// Parses an id; `None` unless it has the shape of one.
    pub fn parse(s: &str) -> Option<Self> {
        if s.len() != SESSION_ID_LEN || !s.is_ascii() {
            return None;
        }
        let rest = s.strip_prefix(SESSION_PREFIX)?;
        Bucket::parse_hint(&rest[..HINT_LEN])?;
        (rest.as_bytes()[HINT_LEN] == b'_' && is_b64url(&rest[HINT_LEN + 1..])).then(|| Self(s.to_owned()))
    }

    /// The bucket it lives in.
    pub fn bucket(&self) -> Bucket {
        let hint = &self.0[SESSION_PREFIX.len()..SESSION_PREFIX.len() + HINT_LEN];
        Bucket::parse_hint(hint).expect("a session id always carries a valid hint")
    }

    /// The id text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The keyed hash of token hashes that audit events carry: HMAC-SHA256 with
/// a configured secret over SHA-256(token). Someone holding a token can find
/// its events (given the key); the events cannot be used to look anything up
/// in Redis, and the key never leaves this process.
#[derive(Clone)]
pub struct AuditHasher(Hmac<Sha256>);

impl fmt::Debug for AuditHasher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AuditHasher(..)")
    }
}

impl AuditHasher {
    /// A hasher keyed with `key`.
    pub fn new(key: &[u8]) -> Self {
        Self(Hmac::new_from_slice(key).expect("hmac takes keys of any length"))
    }

    /// A hasher with a random key (when none is configured).
    pub fn random() -> Self {
        Self::new(&random::<32>())
    }

    /// The salted hash of a token, as lowercase hex.
    pub fn hash(&self, token: &TokenHash) -> String {
        let mut mac = self.0.clone();
        mac.update(&token.0);
        hex::encode(mac.finalize().into_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_carry_their_bucket() {
        for n in [0, 1, 511, BUCKETS - 1] {
            let b = Bucket::new(n).unwrap();
            let t = Token::generate(b);
            assert_eq!(t.expose().len(), TOKEN_LEN);
            assert!(t.expose().starts_with("msess_"));
            let (bucket, hash) = Token::parse(t.expose()).expect("parses");
            assert_eq!((bucket, hash), (b, t.hash()));
        }
        assert_ne!(Token::generate(Bucket(7)), Token::generate(Bucket(7)));
    }

    #[test]
    fn malformed_tokens_are_refused() {
        let t = Token::generate(Bucket(42)).expose().to_owned();
        let mut flipped = t.clone().into_bytes();
        flipped[20] = if flipped[20] == b'A' { b'B' } else { b'A' };
        let bad = [
            String::new(),
            t[..t.len() - 1].to_owned(),
            format!("{t}x"),
            t.replacen("msess_", "mxess_", 1),
            t.replacen("02a", "4ff", 1), // bucket out of range (and checksum)
            String::from_utf8(flipped).unwrap(),
            "é".repeat(TOKEN_LEN / 2),
        ];
        for b in bad {
            assert_eq!(Token::parse(&b), None, "{b:?}");
        }
    }

    #[test]
    fn tokens_never_print() {
        let t = Token::generate(Bucket(1));
        assert_eq!(format!("{t:?}"), "Token(..)");
        assert_eq!(format!("{:?}", t.hash()), "TokenHash(..)");
    }

    #[test]
    fn session_ids_route_to_their_bucket() {
        let b = Bucket::of_user("alice");
        let id = SessionId::generate(b);
        assert_eq!(SessionId::parse(id.as_str()), Some(id.clone()));
        assert_eq!(id.bucket(), b);
        for bad in ["", "ses_", "ses_zzz_AAAAAAAAAAAAAAAAAAAAAA", "ses_400_AAAAAAAAAAAAAAAAAAAAAA", "xyz"] {
            assert_eq!(SessionId::parse(bad), None, "{bad:?}");
        }
        assert!(SessionId::parse("ses_3ff_AAAAAAAAAAAAAAAAAAAAAA").is_some());
    }

    #[test]
    fn buckets_spread_users_and_parse_back_from_keys() {
        let mut seen = std::collections::HashSet::new();
        for i in 0..5000 {
            seen.insert(Bucket::of_user(&format!("user-{i}")));
        }
        assert!(seen.len() > 900, "{} buckets used", seen.len());
        let b = Bucket(0x2a);
        assert_eq!(b.base("mesh:"), "mesh:{session:02a}:");
        assert_eq!(Bucket::from_key("mesh:", "mesh:{session:02a}:c"), Some(b));
        assert_eq!(Bucket::from_key("mesh:", "other:{session:02a}:c"), None);
        assert_eq!(Bucket::from_key("mesh:", "mesh:{session:02a"), None);
    }

    #[test]
    fn the_audit_hash_is_keyed() {
        let h = Token::generate(Bucket(1)).hash();
        let a = AuditHasher::new(b"one").hash(&h);
        assert_eq!(a, AuditHasher::new(b"one").hash(&h));
        assert_ne!(a, AuditHasher::new(b"two").hash(&h));
        assert_ne!(a, h.hex());
        assert_eq!(a.len(), 64);
    }
}
