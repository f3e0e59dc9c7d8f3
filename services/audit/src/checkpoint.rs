//! Signed checkpoints of the chain head, kept outside the database.
//!
//! A superuser can rewrite the events and recompute every later hash and
//! the chain head, or delete the newest events and move the head back; the
//! chain then verifies. What such a person cannot do is sign: the service
//! periodically signs the durable chain head with an Ed25519 key that lives
//! in a file (never in PostgreSQL) and writes the result to a directory.
//! `mesh-audit verify --checkpoints <dir> --public-key <file>` then checks
//! the database against every checkpoint.
//!
//! # Format
//!
//! A checkpoint is a [C2SP signed note](https://c2sp.org/signed-note) whose
//! text follows [C2SP tlog-checkpoint](https://c2sp.org/tlog-checkpoint),
//! adapted to a hash chain:
//!
//! ```text
//! mesh.local/audit                                  origin: the key's name
//! 1234                                              size: events in the chain (its last sequence)
//! q2Zk…base64…=                                     hash: the chain head, hash of event `size`
//!                                                   (genesis, 32 zero bytes, for size 0)
//! — mesh.local/audit <base64(key id || signature)>
//! ```
//!
//! The key id is the first 4 bytes (big-endian) of
//! `SHA-256(name || "\n" || 0x01 || public key)`; the signature is Ed25519
//! over the text (the three lines, each ending in `\n`). Keys use the same
//! encodings as Go's `golang.org/x/mod/sumdb/note`: the private key file
//! holds `PRIVATE+KEY+<name>+<key id hex>+<base64(0x01 || seed)>`, the public
//! key file `<name>+<key id hex>+<base64(0x01 || public key)>`, so any
//! signed-note implementation verifies the signature. The third line is a
//! hash-chain head, not a Merkle root: checking it means recomputing the
//! chain (`hash = SHA-256(prev_hash || canonical(event))`, [`crate::chain`]).
//!
//! # Files
//!
//! `<dir>/<size, 20 digits>.checkpoint`, one per published size, and
//! `<dir>/latest`, a copy of the newest. Each is written to a temporary file
//! in the directory, flushed, and renamed over its name, so a reader sees a
//! whole checkpoint or none.

use std::{
    io::Write as _,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use base64::{Engine as _, engine::general_purpose::STANDARD as B64};
use ed25519_dalek::{Signature, Signer as _, SigningKey, VerifyingKey};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use sha2::{Digest as _, Sha256};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::{
    chain::{GENESIS, Hash},
    store,
};

/// The signed-note algorithm byte of Ed25519.
const ALG_ED25519: u8 = 1;
/// The name of the copy of the newest checkpoint.
pub const LATEST: &str = "latest";
/// The suffix of numbered checkpoint files.
pub const SUFFIX: &str = ".checkpoint";

/// A key or note that cannot be used; the text says why (never key material).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct FormatError(pub String);

fn bad(why: impl Into<String>) -> FormatError {
    FormatError(why.into())
}

/// Whether `name` can be a signed-note key name: non-empty, no whitespace
/// or control characters, no `+`.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty() && !name.chars().any(|c| c.is_whitespace() || c.is_control() || c == '+')
}

fn key_id(name: &str, public: &VerifyingKey) -> u32 {
    let mut h = Sha256::new();
    h.update(name.as_bytes());
    h.update(b"\n");
    h.update([ALG_ED25519]);
    h.update(public.as_bytes());
    let d = h.finalize();
    u32::from_be_bytes([d[0], d[1], d[2], d[3]])
}

/// Decodes `base64(0x01 || 32 bytes)`.
fn key_bytes(b64: &str) -> Result<[u8; 32], FormatError> {
    let raw = B64.decode(b64).map_err(|_| bad("the key is not base64"))?;
    match raw.split_first() {
        Some((&ALG_ED25519, rest)) => rest.try_into().map_err(|_| bad("the key is not 32 bytes")),
        _ => Err(bad("the key is not an Ed25519 key (algorithm byte 0x01)")),
    }
}

/// A signing key: a name and an Ed25519 key. Its `Debug` shows only the name.
#[derive(Clone)]
pub struct SignerKey {
    name: String,
    key: SigningKey,
    id: u32,
}

impl std::fmt::Debug for SignerKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SignerKey").field("name", &self.name).finish_non_exhaustive()
    }
}

impl SignerKey {
    /// A new key named `name` from the operating system's random source.
    pub fn generate(name: &str) -> Result<Self, FormatError> {
        use rand::TryRngCore as _;
        let mut seed = [0u8; 32];
        rand::rngs::OsRng.try_fill_bytes(&mut seed).map_err(|e| bad(format!("no randomness: {e}")))?;
        Self::from_seed(name, seed)
    }

    fn from_seed(name: &str, seed: [u8; 32]) -> Result<Self, FormatError> {
        if !valid_name(name) {
            return Err(bad("a key name must be non-empty, without spaces or '+'"));
        }
        let key = SigningKey::from_bytes(&seed);
        let id = key_id(name, &key.verifying_key());
        Ok(Self { name: name.to_owned(), key, id })
    }

    /// Parses `PRIVATE+KEY+<name>+<key id hex>+<base64(0x01 || seed)>`.
    pub fn parse(text: &str) -> Result<Self, FormatError> {
        let rest = text.trim().strip_prefix("PRIVATE+KEY+").ok_or_else(|| bad("not a signer key"))?;
        let mut parts = rest.splitn(3, '+');
        let (Some(name), Some(id), Some(key)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(bad("a signer key has the form PRIVATE+KEY+<name>+<id>+<key>"));
        };
        let k = Self::from_seed(name, key_bytes(key)?)?;
        if format!("{:08x}", k.id) != id {
            return Err(bad("the signer key's id does not match its name and key"));
        }
        Ok(k)
    }

    /// `PRIVATE+KEY+<name>+<key id hex>+<base64(0x01 || seed)>`.
    pub fn encode(&self) -> String {
        let mut raw = vec![ALG_ED25519];
        raw.extend_from_slice(self.key.as_bytes());
        format!("PRIVATE+KEY+{}+{:08x}+{}", self.name, self.id, B64.encode(raw))
    }

    /// The key's name (a checkpoint's origin).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The matching verifier key.
    pub fn verifier(&self) -> VerifierKey {
        VerifierKey { name: self.name.clone(), key: self.key.verifying_key(), id: self.id }
    }

    /// `text` (ending in a newline) as a signed note: the text, a blank
    /// line and one signature line.
    pub fn sign_note(&self, text: &str) -> String {
        debug_assert!(text.ends_with('\n') && !text.contains("\n\n"));
        let sig = self.key.sign(text.as_bytes());
        let mut blob = self.id.to_be_bytes().to_vec();
        blob.extend_from_slice(&sig.to_bytes());
        format!("{text}\n\u{2014} {} {}\n", self.name, B64.encode(blob))
    }
}

/// A verifier key: a name and an Ed25519 public key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifierKey {
    name: String,
    key: VerifyingKey,
    id: u32,
}

impl VerifierKey {
    /// Parses `<name>+<key id hex>+<base64(0x01 || public key)>`.
    pub fn parse(text: &str) -> Result<Self, FormatError> {
        let mut parts = text.trim().splitn(3, '+');
        let (Some(name), Some(id), Some(key)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(bad("a verifier key has the form <name>+<id>+<key>"));
        };
        if !valid_name(name) {
            return Err(bad("the verifier key's name is not a valid key name"));
        }
        let key = VerifyingKey::from_bytes(&key_bytes(key)?).map_err(|_| bad("not an Ed25519 public key"))?;
        let k = Self { name: name.to_owned(), id: key_id(name, &key), key };
        if format!("{:08x}", k.id) != id {
            return Err(bad("the verifier key's id does not match its name and key"));
        }
        Ok(k)
    }

    /// `<name>+<key id hex>+<base64(0x01 || public key)>`.
    pub fn encode(&self) -> String {
        let mut raw = vec![ALG_ED25519];
        raw.extend_from_slice(self.key.as_bytes());
        format!("{}+{:08x}+{}", self.name, self.id, B64.encode(raw))
    }

    /// The key's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The text of a signed note, if this key signed it (other signature
    /// lines are allowed and ignored).
    pub fn open<'n>(&self, note: &'n str) -> Result<&'n str, FormatError> {
        let split = note.rfind("\n\n").ok_or_else(|| bad("no blank line before the signatures"))?;
        let (text, sigs) = (&note[..=split], &note[split + 2..]);
        if !sigs.ends_with('\n') {
            return Err(bad("the signature lines do not end in a newline"));
        }
        let mut ours = false;
        for line in sigs.lines() {
            let Some((name, blob)) = line.strip_prefix("\u{2014} ").and_then(|l| l.split_once(' ')) else {
                return Err(bad(format!("malformed signature line {line:?}")));
            };
            let Ok(blob) = B64.decode(blob) else { return Err(bad("a signature is not base64")) };
            if name != self.name || blob.len() < 4 || blob[..4] != self.id.to_be_bytes() {
                continue;
            }
            ours = true;
            let sig = <[u8; 64]>::try_from(&blob[4..]).map_err(|_| bad("the signature is not 64 bytes"))?;
            if self.key.verify_strict(text.as_bytes(), &Signature::from_bytes(&sig)).is_ok() {
                return Ok(text);
            }
        }
        Err(bad(if ours {
            format!("the signature by {} does not verify: the text was changed", self.name)
        } else {
            format!("not signed by key {}+{:08x}", self.name, self.id)
        }))
    }
}

/// The text of a checkpoint: which chain, how long, and its head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    /// The chain's name (the signing key's name).
    pub origin: String,
    /// Events in the chain: its last sequence (0 for none).
    pub size: u64,
    /// The hash of event `size` (genesis for 0).
    pub hash: Hash,
}

impl Checkpoint {
    /// The note text: three lines, each ending in `\n`.
    pub fn text(&self) -> String {
        format!("{}\n{}\n{}\n", self.origin, self.size, B64.encode(self.hash))
    }

    /// Parses a note text (three lines; extension lines after them are
    /// allowed and ignored, as the format says).
    pub fn parse(text: &str) -> Result<Self, FormatError> {
        let body = text.strip_suffix('\n').ok_or_else(|| bad("the text does not end in a newline"))?;
        let mut lines = body.split('\n');
        let (Some(origin), Some(size), Some(hash)) = (lines.next(), lines.next(), lines.next()) else {
            return Err(bad("a checkpoint has at least three lines"));
        };
        if origin.is_empty() || lines.any(str::is_empty) {
            return Err(bad("a checkpoint has no empty lines"));
        }
        let canonical = !size.is_empty()
            && size.bytes().all(|b| b.is_ascii_digit())
            && (size == "0" || !size.starts_with('0'));
        let size = size.parse().ok().filter(|_| canonical).ok_or_else(|| bad("the size is not a decimal"))?;
        let hash = B64
            .decode(hash)
            .ok()
            .and_then(|h| Hash::try_from(h).ok())
            .ok_or_else(|| bad("the hash is not 32 bytes of base64"))?;
        Ok(Self { origin: origin.to_owned(), size, hash })
    }
}

/// The file name of the checkpoint at `size`.
pub fn file_name(size: u64) -> String {
    format!("{size:020}{SUFFIX}")
}

/// Writes `bytes` to `dir/name` atomically: a temporary file in `dir`,
/// flushed to disk, renamed over `name`, and the directory flushed.
fn write_atomically(dir: &Path, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    let mut tmp = tempfile::Builder::new().prefix(".tmp-").tempfile_in(dir)?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(dir.join(name)).map_err(|e| e.error)?;
    std::fs::File::open(dir)?.sync_all()
}

/// Writes a signed checkpoint at `size` and, unless `latest` already holds
/// a larger size, `latest`. Writing the same size again rewrites the same
/// bytes (Ed25519 signatures are deterministic), so several publishers
/// with one key are harmless.
pub fn write(dir: &Path, size: u64, note: &str) -> std::io::Result<()> {
    let name = file_name(size);
    if std::fs::read_to_string(dir.join(&name)).ok().as_deref() != Some(note) {
        write_atomically(dir, &name, note.as_bytes())?;
    }
    let latest = std::fs::read_to_string(dir.join(LATEST)).ok();
    let latest_size = latest.as_deref().and_then(|n| n.lines().nth(1)).and_then(|s| s.parse::<u64>().ok());
    if latest_size.is_none_or(|l| l < size) {
        write_atomically(dir, LATEST, note.as_bytes())?;
    }
    Ok(())
}

/// A checkpoint read back from a directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    /// Its file name.
    pub file: String,
    /// What it says.
    pub checkpoint: Checkpoint,
}

/// What is wrong with the checkpoints or with the database measured against them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// The checkpoint file concerned, if one.
    pub checkpoint: Option<String>,
    /// The first sequence concerned, if one.
    pub sequence: Option<u64>,
    /// What is wrong.
    pub problem: String,
}

/// Reads every checkpoint in `dir` (`*.checkpoint` and `latest`), checking
/// each one's signature by `key`, its origin (the key's name), that a
/// numbered file holds its own size, and that no two sign different heads
/// for one size. Sorted by size. `Err(Ok(finding))`: a checkpoint is bad;
/// `Err(Err(_))`: the directory cannot be read.
pub fn read_dir(dir: &Path, key: &VerifierKey) -> Result<Vec<Published>, Result<Finding, std::io::Error>> {
    let mut names: Vec<String> = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(Err)? {
        let name = entry.map_err(Err)?.file_name().to_string_lossy().into_owned();
        if name.ends_with(SUFFIX) || name == LATEST {
            names.push(name);
        }
    }
    names.sort();
    let mut out: Vec<Published> = Vec::new();
    for file in names {
        let finding =
            |problem: String| Ok(Finding { checkpoint: Some(file.clone()), sequence: None, problem });
        let note = std::fs::read_to_string(dir.join(&file)).map_err(Err)?;
        let text = key.open(&note).map_err(|e| finding(format!("checkpoint {file}: {e}")))?;
        let checkpoint = Checkpoint::parse(text).map_err(|e| finding(format!("checkpoint {file}: {e}")))?;
        if checkpoint.origin != key.name() {
            return Err(finding(format!(
                "checkpoint {file} is for origin {:?}, not {:?}",
                checkpoint.origin,
                key.name()
            )));
        }
        if file != LATEST && file != file_name(checkpoint.size) {
            return Err(finding(format!("checkpoint {file} holds size {}", checkpoint.size)));
        }
        out.push(Published { file, checkpoint });
    }
    // by size; for one size, `latest` before the numbered file, so the last is a numbered one
    out.sort_by_key(|p| (p.checkpoint.size, p.file != LATEST));
    for pair in out.windows(2) {
        let (a, b) = (&pair[0], &pair[1]);
        if a.checkpoint.size == b.checkpoint.size && a.checkpoint.hash != b.checkpoint.hash {
            return Err(Ok(Finding {
                checkpoint: Some(b.file.clone()),
                sequence: Some(b.checkpoint.size),
                problem: format!(
                    "checkpoints {} and {} sign different heads for size {}: the key signed two chains",
                    a.file, b.file, b.checkpoint.size
                ),
            }));
        }
    }
    Ok(out)
}

/// Where and how to publish checkpoints.
#[derive(Debug, Clone)]
pub(crate) struct Publishing {
    pub(crate) dir: PathBuf,
    pub(crate) key: Arc<SignerKey>,
    pub(crate) interval: Duration,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

/// Registers the checkpoint metrics and, when `publishing` is configured,
/// publishes a checkpoint of the durable chain head every `interval` while
/// it has moved since the last one, until `stop`. A failure (database,
/// disk) is logged and counted and the next tick tries again.
pub(crate) fn start(
    pool: PgPool,
    publishing: Option<Publishing>,
    stop: CancellationToken,
    registry: &mut Registry,
) {
    let results = Family::<ResultLabels, Counter>::default();
    for result in ["published", "failed"] {
        let _ = results.get_or_create(&ResultLabels { result });
    }
    let size = Gauge::<i64>::default();
    registry.register(
        "mesh_audit_checkpoints",
        "Signed checkpoints written by this instance, by result (published, failed)",
        results.clone(),
    );
    registry.register(
        "mesh_audit_checkpoint_size",
        "The chain size (last sequence) of the newest checkpoint this instance wrote",
        size.clone(),
    );
    let Some(publishing) = publishing else { return };
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(publishing.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut published: Option<u64> = None;
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            match publish_once(&pool, &publishing, published).await {
                Ok(Some(n)) => {
                    published = Some(n);
                    results.get_or_create(&ResultLabels { result: "published" }).inc();
                    size.set(n as i64);
                    tracing::debug!(size = n, "checkpoint published");
                }
                Ok(None) => {}
                Err(e) => {
                    results.get_or_create(&ResultLabels { result: "failed" }).inc();
                    tracing::warn!(error = %e, dir = %publishing.dir.display(), "cannot publish a checkpoint");
                }
            }
        }
    });
}

/// Signs and writes the durable head unless it is still `published`.
async fn publish_once(
    pool: &PgPool,
    publishing: &Publishing,
    published: Option<u64>,
) -> anyhow::Result<Option<u64>> {
    // Only what is flushed: a checkpoint must never name an event a crash can still take back.
    let head = store::durable_head(pool, published.unwrap_or(0)).await?;
    let size = head.last();
    if published == Some(size) {
        return Ok(None);
    }
    let hash = if size == 0 { GENESIS } else { head.hash };
    let text = Checkpoint { origin: publishing.key.name().to_owned(), size, hash }.text();
    let note = publishing.key.sign_note(&text);
    let dir = publishing.dir.clone();
    tokio::task::spawn_blocking(move || write(&dir, size, &note)).await??;
    Ok(Some(size))
}

#[cfg(test)]
mod tests {
    use super::*;

    // The example of golang.org/x/mod/sumdb/note's documentation: the same
    // key must give the same key ids, encodings and signature, byte for byte.
    const GO_SKEY: &str = "PRIVATE+KEY+PeterNeumann+c74f20a3+AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz";
    const GO_VKEY: &str = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW";
    const GO_TEXT: &str = "If you think cryptography is the answer to your problem,\nthen you don't know what your problem is.\n";
    const GO_SIG: &str = "\u{2014} PeterNeumann x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqdngotpRZb6KE6RyyBwJnAM=\n";

    #[test]
    fn keys_and_signatures_match_the_go_reference_byte_for_byte() {
        let skey = SignerKey::parse(GO_SKEY).unwrap();
        assert_eq!(skey.encode(), GO_SKEY);
        assert_eq!(skey.verifier().encode(), GO_VKEY);
        let note = skey.sign_note(GO_TEXT);
        assert_eq!(note, format!("{GO_TEXT}\n{GO_SIG}"));
        let vkey = VerifierKey::parse(GO_VKEY).unwrap();
        assert_eq!(vkey.open(&note).unwrap(), GO_TEXT);
        // the C2SP signed-note specification's example
        let spec =
            VerifierKey::parse("example.com/foo+530d903a+AekyeRrm56hApGFkyQR4ZCbV54Id2LKaANYcrnKv3U2k")
                .unwrap();
        let spec_note = "This is an example message.\n\n\u{2014} example.com/foo Uw2QOkn8srV1yJGh2VYRlL1Tnagv1YEq6TfXppzi2ONncAlTgK7Ztg1ERYNZXsYjOBH3mFXmRKuwHjG1Yu72IneyaQM=\n";
        assert_eq!(spec.open(spec_note).unwrap(), "This is an example message.\n");
    }

    #[test]
    fn a_changed_text_or_another_key_does_not_verify() {
        let key = SignerKey::generate("mesh.test/audit").unwrap();
        let again = SignerKey::parse(&key.encode()).unwrap();
        assert_eq!(again.verifier(), key.verifier());
        let cp = Checkpoint { origin: key.name().into(), size: 42, hash: [7; 32] };
        let note = key.sign_note(&cp.text());
        let v = key.verifier();
        assert_eq!(Checkpoint::parse(v.open(&note).unwrap()).unwrap(), cp);
        let forged = note.replacen("\n42\n", "\n43\n", 1);
        assert!(v.open(&forged).unwrap_err().0.contains("does not verify"), "{:?}", v.open(&forged));
        let other = SignerKey::generate("mesh.test/audit").unwrap().verifier();
        assert!(other.open(&note).unwrap_err().0.contains("not signed by"));
        assert!(VerifierKey::parse(&v.encode().replacen('+', "x+", 1)).is_err(), "the id covers the name");
        assert!(SignerKey::generate("has space").is_err() && SignerKey::generate("a+b").is_err());
        assert!(!format!("{key:?}").contains(&key.encode()[12..]), "Debug never shows the key");
    }

    #[test]
    fn checkpoint_texts_are_strict() {
        let h = B64.encode([1u8; 32]);
        assert!(Checkpoint::parse(&format!("o\n5\n{h}\n")).is_ok());
        assert!(Checkpoint::parse(&format!("o\n5\n{h}\next\n")).is_ok(), "extension lines");
        for bad in [
            format!("o\n05\n{h}\n"),
            format!("o\n-5\n{h}\n"),
            format!("o\n5\n{h}"),
            format!("\n5\n{h}\n"),
            "o\n5\nAAAA\n".to_owned(),
            format!("o\n5\n{h}\n\n"),
        ] {
            assert!(Checkpoint::parse(&bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn files_are_written_whole_and_latest_never_goes_back() {
        let dir = tempfile::tempdir().unwrap();
        let key = SignerKey::generate("o").unwrap();
        let note =
            |size| key.sign_note(&Checkpoint { origin: "o".into(), size, hash: [size as u8; 32] }.text());
        write(dir.path(), 5, &note(5)).unwrap();
        write(dir.path(), 9, &note(9)).unwrap();
        write(dir.path(), 7, &note(7)).unwrap(); // a slower publisher
        write(dir.path(), 9, &note(9)).unwrap(); // another publisher, same size: same bytes
        let read = |n: &str| std::fs::read_to_string(dir.path().join(n)).unwrap();
        assert_eq!(read(LATEST), note(9));
        assert_eq!(read(&file_name(7)), note(7));
        let all = read_dir(dir.path(), &key.verifier()).unwrap();
        let sizes: Vec<u64> = all.iter().map(|p| p.checkpoint.size).collect();
        assert_eq!(sizes, [5, 7, 9, 9]);
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with('.'))
            .collect();
        assert!(names.is_empty(), "no temporary files left: {names:?}");
        // a forked size is named
        std::fs::write(
            dir.path().join(LATEST),
            key.sign_note(&Checkpoint { origin: "o".into(), size: 9, hash: [0; 32] }.text()),
        )
        .unwrap();
        let finding = read_dir(dir.path(), &key.verifier()).unwrap_err().unwrap();
        assert!(finding.problem.contains("different heads for size 9"), "{finding:?}");
    }
}
