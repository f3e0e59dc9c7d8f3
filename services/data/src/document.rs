//! Documents: a caller's `google.protobuf.Struct`, checked once and kept in
//! two forms.
//!
//! - **`body`**: the Struct's protobuf encoding, byte for byte what reads
//!   return. This is what makes values round-trip exactly: JSONB stores
//!   numbers as `numeric` (so `-0` becomes `0`) and cannot hold U+0000,
//!   while the protobuf encoding keeps every `double` bit pattern.
//! - **`json`**: JSON text for the JSONB column that containment queries
//!   (`@>`) and their GIN index use. Numbers are written in the shortest form
//!   that reads back as the same double (`123456789.12345679`,
//!   `1.7976931348623157e308`, `5e-324`), so a filter holding a number
//!   matches the documents holding that very number.
//!
//! What JSON and JSONB cannot hold is refused up front (INVALID_ARGUMENT,
//! naming the path): NaN and infinities, U+0000 in a string or a field
//! name, nesting deeper than [`MAX_DEPTH`], and documents over
//! [`MAX_DOCUMENT_BYTES`].

use mesh_proto::json;
use prost::Message as _;
use prost_types::Struct;

/// Most bytes of a document's protobuf encoding (1 MiB, as Firestore).
pub const MAX_DOCUMENT_BYTES: usize = 1 << 20;

/// Deepest nesting of objects and lists, the document itself being depth 1
/// (Firestore allows 20 too). Each level costs three protobuf messages
/// (Struct, its map entry, Value) of gRPC's 100-message decoding limit: a
/// document this deep still decodes inside a Batch or a Query response;
/// one nested beyond about 33 levels cannot even be decoded (INTERNAL from
/// the gRPC decoder, before the service sees it).
pub const MAX_DEPTH: usize = 20;

/// A document checked for storage.
#[derive(Debug, Clone)]
pub(crate) struct Document {
    /// JSON text for the JSONB column.
    pub(crate) json: String,
    /// The Struct's protobuf encoding: what reads return.
    pub(crate) body: Vec<u8>,
}

/// Why a Struct cannot be stored: the path of the offending value (from
/// `field`, e.g. `document.items[2].name`) and what is wrong with it.
pub(crate) use mesh_proto::json::Invalid;

/// Checks `s` for storage (see the module docs); `field` names it in errors.
pub(crate) fn document(field: &str, s: &Struct) -> Result<Document, Invalid> {
    json::check(field, s, MAX_DEPTH)?;
    let body = s.encode_to_vec();
    if body.len() > MAX_DOCUMENT_BYTES {
        return Err(Invalid {
            path: field.to_owned(),
            reason: format!("must be at most {MAX_DOCUMENT_BYTES} bytes encoded, got {}", body.len()),
        });
    }
    Ok(Document { json: to_json(s), body })
}

/// Checks a query filter and returns it as JSON text.
pub(crate) fn filter(field: &str, s: &Struct) -> Result<String, Invalid> {
    json::check(field, s, MAX_DEPTH)?;
    Ok(to_json(s))
}

/// JSON text of a checked Struct (the one conversion, [`mesh_proto::json`]).
pub(crate) fn to_json(s: &Struct) -> String {
    json::to_json(s)
}

/// Decodes a stored body.
pub(crate) fn decode(body: &[u8]) -> Result<Struct, prost::DecodeError> {
    Struct::decode(body)
}

#[cfg(test)]
pub(crate) mod tests {
    use std::collections::BTreeMap;

    use prost_types::{ListValue, Value, value::Kind};

    use super::*;

    pub(crate) fn num(n: f64) -> Value {
        Value { kind: Some(Kind::NumberValue(n)) }
    }

    pub(crate) fn text(s: &str) -> Value {
        Value { kind: Some(Kind::StringValue(s.to_owned())) }
    }

    pub(crate) fn obj(fields: &[(&str, Value)]) -> Struct {
        Struct { fields: fields.iter().map(|(k, v)| ((*k).to_owned(), v.clone())).collect() }
    }

    fn nest(depth: usize) -> Struct {
        let mut s = obj(&[("leaf", num(1.0))]);
        for _ in 1..depth {
            s = Struct {
                fields: BTreeMap::from([("n".to_owned(), Value { kind: Some(Kind::StructValue(s)) })]),
            };
        }
        s
    }

    #[test]
    fn numbers_are_written_in_their_shortest_exact_form() {
        let s = obj(&[
            ("a", num(123456789.12345679)),
            ("b", num(0.30000000000000004)),
            ("c", num(f64::MAX)),
            ("d", num(5e-324)),
            ("e", num(-0.0)),
            ("f", num(123456789012345678901.0)),
            ("g", num(3.0)),
        ]);
        assert_eq!(
            to_json(&s),
            r#"{"a":123456789.12345679,"b":0.30000000000000004,"c":1.7976931348623157e+308,"d":5e-324,"e":-0.0,"f":1.2345678901234568e+20,"g":3.0}"#
        );
        let d = document("document", &s).unwrap();
        assert_eq!(decode(&d.body).unwrap(), s, "the body is the Struct, bit for bit");
        let back = decode(&d.body).unwrap();
        let Some(Kind::NumberValue(e)) = back.fields["e"].kind else { panic!() };
        assert!(e == 0.0 && e.is_sign_negative());
    }

    #[test]
    fn what_jsonb_cannot_hold_is_refused_with_its_path() {
        let bad = |s: Struct| document("document", &s).unwrap_err();
        let e = bad(obj(&[("a", Value { kind: Some(Kind::StructValue(obj(&[("b c", text("x\0y"))]))) })]));
        assert_eq!(e.path, r#"document.a["b c"]"#);
        assert!(e.reason.contains("U+0000"), "{e:?}");
        let list = Value { kind: Some(Kind::ListValue(ListValue { values: vec![num(1.0), num(f64::NAN)] })) };
        assert_eq!(bad(obj(&[("xs", list)])).path, "document.xs[1]");
        assert_eq!(bad(obj(&[("x\0", num(1.0))])).path, "document");
        assert_eq!(bad(obj(&[("inf", num(f64::INFINITY))])).path, "document.inf");
        assert!(document("document", &nest(MAX_DEPTH)).is_ok());
        assert!(bad(nest(MAX_DEPTH + 1)).reason.contains("deeper"));
        let big = obj(&[("s", text(&"x".repeat(MAX_DOCUMENT_BYTES)))]);
        assert!(bad(big).reason.contains("at most"));
    }

    #[test]
    fn strings_keep_unicode_and_escapes() {
        let s = obj(&[("s", text("é\u{1F600}\"\\\n\u{1}"))]);
        assert_eq!(to_json(&s), "{\"s\":\"é\u{1F600}\\\"\\\\\\n\\u0001\"}");
    }
}
