//! Requests parsed once, at the boundary, into the types the rest of the
//! service trusts. Bad input is INVALID_ARGUMENT with one violation per
//! field (paths like `ops[3].put.document.items[2]`) and nothing is read or
//! written.

use mesh_db::Lsn;
use mesh_proto::data as pb;
use tonic_types::FieldViolation;

use crate::{
    document::{self, Document},
    error::Error,
    token::{self, PageTokenError},
};

/// Longest collection name or key (bytes).
pub const MAX_NAME: usize = 256;
/// Most collections one Batch may touch: each is its own rate-limit
/// descriptor, and the rate-limit service takes 64 descriptors per Check.
pub const MAX_BATCH_COLLECTIONS: usize = 32;
/// Query page size when the request asks for none.
pub const DEFAULT_PAGE_SIZE: usize = 50;
/// Largest Query page; larger requests are coerced down (AIP-158).
pub const MAX_PAGE_SIZE: usize = 1000;

/// A collection name: 1–256 bytes, no `/` (it separates collection and key
/// in audit resource ids), no control characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Collection(String);

/// A key: 1–256 bytes, no U+0000 (PostgreSQL text cannot hold it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Key(String);

impl Collection {
    pub(crate) fn as_str(&self) -> &str {
        &self.0
    }
}

impl Key {
    pub(crate) fn as_str(&self) -> &str {
        &self.0
    }
}

/// What a write does.
#[derive(Debug, Clone)]
pub(crate) enum Op {
    Put(Document),
    Delete,
}

/// One checked write (Put, Delete, or an operation of a Batch).
#[derive(Debug, Clone)]
pub(crate) struct Write {
    pub(crate) collection: Collection,
    pub(crate) key: Key,
    pub(crate) op: Op,
    /// `None`: unconditional; `Some(0)`: must not exist; `Some(n)`: must be at version n.
    pub(crate) expected: Option<u64>,
}

/// A checked Get.
#[derive(Debug, Clone)]
pub(crate) struct Get {
    pub(crate) collection: Collection,
    pub(crate) key: Key,
    pub(crate) at: Option<Lsn>,
}

/// A checked Query.
#[derive(Debug, Clone)]
pub(crate) struct Query {
    pub(crate) collection: Collection,
    /// The containment filter as JSON; `None` for no filter (or an empty one).
    pub(crate) filter: Option<String>,
    pub(crate) page_size: usize,
    /// Keys after this one; `None` from the start.
    pub(crate) after: Option<String>,
    /// What binds page tokens to this query.
    pub(crate) hash: [u8; 16],
    pub(crate) at: Option<Lsn>,
}

#[derive(Debug, Default)]
struct Violations(Vec<FieldViolation>);

impl Violations {
    fn add(&mut self, field: impl Into<String>, description: impl Into<String>) {
        self.0.push(FieldViolation::new(field, description));
    }

    fn finish<T>(self, value: T) -> Result<T, Error> {
        if self.0.is_empty() { Ok(value) } else { Err(Error::InvalidArgument(self.0)) }
    }

    fn name(&mut self, field: &str, v: &str) -> bool {
        if v.is_empty() {
            self.add(field, "must not be empty");
        } else if v.len() > MAX_NAME {
            self.add(field, format!("must be at most {MAX_NAME} bytes, got {}", v.len()));
        } else if v.contains('\0') {
            self.add(field, "must not contain U+0000");
        } else {
            return true;
        }
        false
    }

    fn collection(&mut self, field: &str, v: String) -> Collection {
        if self.name(field, &v) {
            if v.contains('/') {
                self.add(field, "must not contain '/'");
            } else if v.chars().any(char::is_control) {
                self.add(field, "must not contain control characters");
            }
        }
        Collection(v)
    }

    fn key(&mut self, field: &str, v: String) -> Key {
        self.name(field, &v);
        Key(v)
    }

    fn expected(&mut self, field: &str, v: Option<u64>) -> Option<u64> {
        if v.is_some_and(|n| n > i64::MAX as u64) {
            self.add(field, format!("must be at most {}", i64::MAX));
        }
        v
    }

    fn document(&mut self, field: &str, v: Option<prost_types::Struct>) -> Option<Document> {
        let Some(s) = v else {
            self.add(field, "is required (a JSON object)");
            return None;
        };
        match document::document(field, &s) {
            Ok(d) => Some(d),
            Err(e) => {
                self.add(e.path, e.reason);
                None
            }
        }
    }

    fn consistency(&mut self, field: &str, v: &str) -> Option<Lsn> {
        token::parse_consistency(v).unwrap_or_else(|()| {
            self.add(field, "is not a consistency token of this service");
            None
        })
    }

    fn write(
        &mut self,
        prefix: &str,
        collection: String,
        key: String,
        document: Option<Option<prost_types::Struct>>,
        expected: Option<u64>,
    ) -> Option<Write> {
        let collection = self.collection(&format!("{prefix}collection"), collection);
        let key = self.key(&format!("{prefix}key"), key);
        let expected = self.expected(&format!("{prefix}expected_version"), expected);
        let op = match document {
            None => Op::Delete,
            Some(d) => Op::Put(self.document(&format!("{prefix}document"), d)?),
        };
        Some(Write { collection, key, op, expected })
    }
}

/// Parses Put.
pub(crate) fn put(r: pb::PutRequest) -> Result<Write, Error> {
    let mut v = Violations::default();
    let w = v.write("", r.collection, r.key, Some(r.document), r.expected_version);
    v.finish(())?;
    Ok(w.expect("no violations means a write"))
}

/// Parses Delete.
pub(crate) fn delete(r: pb::DeleteRequest) -> Result<Write, Error> {
    let mut v = Violations::default();
    let w = v.write("", r.collection, r.key, None, r.expected_version);
    v.finish(())?;
    Ok(w.expect("no violations means a write"))
}

/// Parses Batch: 1 to `max_ops` operations, each checked like Put or Delete.
pub(crate) fn batch(r: pb::BatchRequest, max_ops: usize) -> Result<Vec<Write>, Error> {
    use pb::batch_operation::Op as BOp;
    let mut v = Violations::default();
    if r.ops.is_empty() {
        v.add("ops", "must hold at least one operation");
    } else if r.ops.len() > max_ops {
        v.add("ops", format!("must hold at most {max_ops} operations, got {}", r.ops.len()));
        return Err(Error::InvalidArgument(v.0));
    }
    let mut writes = Vec::with_capacity(r.ops.len());
    for (i, op) in r.ops.into_iter().enumerate() {
        let w = match op.op {
            None => {
                v.add(format!("ops[{i}]"), "must be a put or a delete");
                None
            }
            Some(BOp::Put(p)) => {
                v.write(&format!("ops[{i}].put."), p.collection, p.key, Some(p.document), p.expected_version)
            }
            Some(BOp::Delete(d)) => {
                v.write(&format!("ops[{i}].delete."), d.collection, d.key, None, d.expected_version)
            }
        };
        writes.extend(w);
    }
    let collections: std::collections::BTreeSet<&str> =
        writes.iter().map(|w| w.collection.as_str()).collect();
    if collections.len() > MAX_BATCH_COLLECTIONS {
        v.add(
            "ops",
            format!(
                "may touch at most {MAX_BATCH_COLLECTIONS} collections (each is rate limited), got {}",
                collections.len()
            ),
        );
    }
    v.finish(writes)
}

/// Parses Get.
pub(crate) fn get(r: pb::GetRequest) -> Result<Get, Error> {
    let mut v = Violations::default();
    let collection = v.collection("collection", r.collection);
    let key = v.key("key", r.key);
    let at = v.consistency("consistency_token", &r.consistency_token);
    v.finish(Get { collection, key, at })
}

/// Parses Query.
pub(crate) fn query(r: pb::QueryRequest) -> Result<Query, Error> {
    let mut v = Violations::default();
    let collection = v.collection("collection", r.collection);
    let filter = match r.filter {
        Some(f) if !f.fields.is_empty() => match document::filter("filter", &f) {
            // Larger than any document, so it could match none: refused
            // before it reaches the database.
            Ok(json) if json.len() > document::MAX_DOCUMENT_BYTES => {
                v.add("filter", format!("must be at most {} bytes as JSON", document::MAX_DOCUMENT_BYTES));
                None
            }
            Ok(json) => Some(json),
            Err(e) => {
                v.add(e.path, e.reason);
                None
            }
        },
        _ => None,
    };
    let page_size = match r.page_size as usize {
        0 => DEFAULT_PAGE_SIZE,
        n => n.min(MAX_PAGE_SIZE),
    };
    let at = v.consistency("consistency_token", &r.consistency_token);
    let hash = token::query_hash(collection.as_str(), filter.as_deref());
    let after = match token::parse_page(&r.page_token, &hash) {
        Ok(after) => after,
        Err(PageTokenError::Malformed) => {
            v.add("page_token", "is not a page token of this service");
            None
        }
        Err(PageTokenError::OtherQuery) => {
            v.add("page_token", "belongs to another query (collection or filter differ)");
            None
        }
    };
    v.finish(Query { collection, filter, page_size, after, hash, at })
}

#[cfg(test)]
mod tests {
    use mesh_proto::data::{BatchOperation, DeleteOperation, PutOperation, batch_operation::Op as BOp};

    use super::*;
    use crate::document::tests::{num, obj, text};

    fn fields(e: Error) -> Vec<String> {
        match e {
            Error::InvalidArgument(v) => v.into_iter().map(|f| f.field).collect(),
            other => panic!("{other:?}"),
        }
    }

    fn put_req(c: &str, k: &str) -> pb::PutRequest {
        pb::PutRequest {
            collection: c.into(),
            key: k.into(),
            document: Some(obj(&[("a", num(1.0))])),
            expected_version: None,
        }
    }

    #[test]
    fn names_are_checked() {
        assert!(put(put_req("orders", "a/b c")).is_ok(), "keys may hold '/' and spaces");
        let e = put(pb::PutRequest { document: None, ..put_req("", &"k".repeat(257)) }).unwrap_err();
        assert_eq!(fields(e), ["collection", "key", "document"]);
        assert_eq!(fields(put(put_req("a/b", "k")).unwrap_err()), ["collection"]);
        assert_eq!(fields(put(put_req("a\nb", "k\0")).unwrap_err()), ["collection", "key"]);
        let e = put(pb::PutRequest { expected_version: Some(u64::MAX), ..put_req("c", "k") }).unwrap_err();
        assert_eq!(fields(e), ["expected_version"]);
    }

    #[test]
    fn batches_name_the_operation_of_every_violation() {
        let ops = vec![
            BatchOperation {
                op: Some(BOp::Put(PutOperation {
                    collection: "c".into(),
                    key: "k".into(),
                    document: Some(obj(&[("s", text("\0"))])),
                    expected_version: None,
                })),
            },
            BatchOperation { op: None },
            BatchOperation {
                op: Some(BOp::Delete(DeleteOperation {
                    collection: "c".into(),
                    key: String::new(),
                    expected_version: Some(1),
                })),
            },
        ];
        let e = batch(pb::BatchRequest { ops }, 500).unwrap_err();
        assert_eq!(fields(e), ["ops[0].put.document.s", "ops[1]", "ops[2].delete.key"]);
        assert_eq!(fields(batch(pb::BatchRequest { ops: vec![] }, 500).unwrap_err()), ["ops"]);
        let many = vec![BatchOperation { op: None }; 3];
        assert_eq!(fields(batch(pb::BatchRequest { ops: many }, 2).unwrap_err()), ["ops"]);
        let spread = (0..=MAX_BATCH_COLLECTIONS)
            .map(|i| BatchOperation {
                op: Some(BOp::Delete(DeleteOperation {
                    collection: format!("c{i}"),
                    key: "k".into(),
                    expected_version: None,
                })),
            })
            .collect();
        assert_eq!(fields(batch(pb::BatchRequest { ops: spread }, 500).unwrap_err()), ["ops"]);
    }

    #[test]
    fn queries_default_and_cap_the_page_and_bind_tokens() {
        let q = query(pb::QueryRequest { collection: "c".into(), ..Default::default() }).unwrap();
        assert_eq!((q.page_size, q.filter, q.after), (DEFAULT_PAGE_SIZE, None, None));
        let q = query(pb::QueryRequest { collection: "c".into(), page_size: 5000, ..Default::default() })
            .unwrap();
        assert_eq!(q.page_size, MAX_PAGE_SIZE);
        let f = Some(obj(&[("s", text("open"))]));
        let q = query(pb::QueryRequest { collection: "c".into(), filter: f.clone(), ..Default::default() })
            .unwrap();
        let next = token::page(&q.hash, "k-9");
        let same = pb::QueryRequest {
            collection: "c".into(),
            filter: f,
            page_token: next.clone(),
            ..Default::default()
        };
        assert_eq!(query(same).unwrap().after.as_deref(), Some("k-9"));
        let other = pb::QueryRequest { collection: "c".into(), page_token: next, ..Default::default() };
        assert_eq!(fields(query(other).unwrap_err()), ["page_token"]);
        let bad = pb::QueryRequest {
            collection: "c".into(),
            page_token: "nope".into(),
            consistency_token: "nope".into(),
            ..Default::default()
        };
        assert_eq!(fields(query(bad).unwrap_err()), ["consistency_token", "page_token"]);
    }
}
