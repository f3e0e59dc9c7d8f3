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

use prost::Message as _;
use prost_types::{ListValue, Struct, Value, value::Kind};
use serde::ser::{Serialize, SerializeMap, SerializeSeq, Serializer};

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
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Invalid {
    pub(crate) path: String,
    pub(crate) reason: String,
}

fn check(v: &Value, path: &mut String, depth: usize) -> Result<(), Invalid> {
    let invalid = |path: &String, reason: &str| Invalid { path: path.clone(), reason: reason.to_owned() };
    match &v.kind {
        None | Some(Kind::NullValue(_)) | Some(Kind::BoolValue(_)) => Ok(()),
        Some(Kind::NumberValue(n)) if !n.is_finite() => {
            Err(invalid(path, "must be a finite number (JSON has no NaN or Infinity)"))
        }
        Some(Kind::NumberValue(_)) => Ok(()),
        Some(Kind::StringValue(s)) if s.contains('\0') => {
            Err(invalid(path, "must not contain U+0000 (JSONB cannot store it)"))
        }
        Some(Kind::StringValue(_)) => Ok(()),
        Some(Kind::StructValue(s)) => check_struct(s, path, depth + 1),
        Some(Kind::ListValue(l)) => check_list(l, path, depth + 1),
    }
}

fn check_struct(s: &Struct, path: &mut String, depth: usize) -> Result<(), Invalid> {
    if depth > MAX_DEPTH {
        return Err(Invalid {
            path: path.clone(),
            reason: format!("nests deeper than {MAX_DEPTH} objects and lists"),
        });
    }
    for (name, v) in &s.fields {
        if name.contains('\0') {
            return Err(Invalid {
                path: path.clone(),
                reason: "field names must not contain U+0000 (JSONB cannot store it)".to_owned(),
            });
        }
        let len = path.len();
        push_field(path, name);
        check(v, path, depth)?;
        path.truncate(len);
    }
    Ok(())
}

fn check_list(l: &ListValue, path: &mut String, depth: usize) -> Result<(), Invalid> {
    if depth > MAX_DEPTH {
        return Err(Invalid {
            path: path.clone(),
            reason: format!("nests deeper than {MAX_DEPTH} objects and lists"),
        });
    }
    for (i, v) in l.values.iter().enumerate() {
        let len = path.len();
        path.push_str(&format!("[{i}]"));
        check(v, path, depth)?;
        path.truncate(len);
    }
    Ok(())
}

/// `.name` for plain names, `["odd name"]` (JSON-quoted) for the rest.
fn push_field(path: &mut String, name: &str) {
    let plain = !name.is_empty()
        && name.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if plain {
        path.push('.');
        path.push_str(name);
    } else {
        path.push('[');
        path.push_str(&serde_json::to_string(name).unwrap_or_default());
        path.push(']');
    }
}

/// Checks `s` for storage (see the module docs); `field` names it in errors.
pub(crate) fn document(field: &str, s: &Struct) -> Result<Document, Invalid> {
    let mut path = field.to_owned();
    check_struct(s, &mut path, 1)?;
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
    let mut path = field.to_owned();
    check_struct(s, &mut path, 1)?;
    Ok(to_json(s))
}

/// JSON text of a checked Struct (every number finite, so nothing is lost
/// to serde_json's `null` for non-finite floats).
pub(crate) fn to_json(s: &Struct) -> String {
    serde_json::to_string(&JsonStruct(s)).expect("a checked Struct always serialises")
}

/// Decodes a stored body.
pub(crate) fn decode(body: &[u8]) -> Result<Struct, prost::DecodeError> {
    Struct::decode(body)
}

struct JsonStruct<'a>(&'a Struct);
struct JsonValue<'a>(&'a Value);

impl Serialize for JsonStruct<'_> {
    fn serialize<S: Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
        let mut map = ser.serialize_map(Some(self.0.fields.len()))?;
        for (k, v) in &self.0.fields {
            map.serialize_entry(k, &JsonValue(v))?;
        }
        map.end()
    }
}

impl Serialize for JsonValue<'_> {
    fn serialize<S: Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
        match &self.0.kind {
            None | Some(Kind::NullValue(_)) => ser.serialize_unit(),
            // Shortest round-trip form (ryu); -0.0 stays "-0.0".
            Some(Kind::NumberValue(n)) => ser.serialize_f64(*n),
            Some(Kind::StringValue(s)) => ser.serialize_str(s),
            Some(Kind::BoolValue(b)) => ser.serialize_bool(*b),
            Some(Kind::StructValue(s)) => JsonStruct(s).serialize(ser),
            Some(Kind::ListValue(l)) => {
                let mut seq = ser.serialize_seq(Some(l.values.len()))?;
                for v in &l.values {
                    seq.serialize_element(&JsonValue(v))?;
                }
                seq.end()
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::collections::BTreeMap;

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
