//! `google.protobuf.Struct` and JSON, without losing a bit: the one
//! conversion the data service (documents) and the audit service (event
//! metadata) share.
//!
//! - [`check`] refuses what JSON and PostgreSQL's `jsonb` cannot hold: NaN
//!   and infinities, U+0000 in a string or a field name, and nesting deeper
//!   than the caller's bound, naming the path of the offending value.
//! - [`to_json`] (and [`AsJson`], to embed a Struct in a larger
//!   `serde_json` value) writes every number in the shortest decimal form
//!   that reads back as the same binary64 (`123456789.12345679`,
//!   `1.7976931348623157e+308`, `5e-324`, `-0.0`), so a `jsonb` copy holds
//!   each value exactly (except the sign of zero: `numeric` has no `-0`).
//! - [`from_json`] and [`parse`] read such text back into the very same
//!   doubles: this crate turns on serde_json's `float_roundtrip`, whose
//!   parser rounds correctly for any length of input, including the long
//!   exponent-free digit strings `jsonb` prints (`179769…0000` for
//!   `f64::MAX`, `0.000…5` for `5e-324`). Integers beyond 2^53 become the
//!   nearest double, as they did when the caller put them in a Struct.

#![warn(clippy::all, unreachable_pub, missing_debug_implementations)]

use prost_types::{ListValue, Struct, Value, value::Kind};
use serde::ser::{Serialize, SerializeMap, SerializeSeq, Serializer};

/// Why a Struct cannot be stored: the path of the offending value (from the
/// `field` given to [`check`], e.g. `document.items[2].name`) and what is
/// wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    /// Where, e.g. `event.metadata.a["b c"][2]`.
    pub path: String,
    /// What is wrong, lowercase, e.g. `must be a finite number (JSON has no NaN or Infinity)`.
    pub reason: String,
}

/// Checks that `s` can be written as JSON and stored in `jsonb`: every
/// number finite, no U+0000 in strings or field names, objects and lists
/// nested at most `max_depth` deep (`s` itself is depth 1). `field` names
/// `s` in the error.
pub fn check(field: &str, s: &Struct, max_depth: usize) -> Result<(), Invalid> {
    let mut path = field.to_owned();
    check_struct(s, &mut path, 1, max_depth)
}

fn check_value(v: &Value, path: &mut String, depth: usize, max: usize) -> Result<(), Invalid> {
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
        Some(Kind::StructValue(s)) => check_struct(s, path, depth + 1, max),
        Some(Kind::ListValue(l)) => check_list(l, path, depth + 1, max),
    }
}

fn too_deep(path: &str, max: usize) -> Invalid {
    Invalid { path: path.to_owned(), reason: format!("nests deeper than {max} objects and lists") }
}

fn check_struct(s: &Struct, path: &mut String, depth: usize, max: usize) -> Result<(), Invalid> {
    if depth > max {
        return Err(too_deep(path, max));
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
        check_value(v, path, depth, max)?;
        path.truncate(len);
    }
    Ok(())
}

fn check_list(l: &ListValue, path: &mut String, depth: usize, max: usize) -> Result<(), Invalid> {
    if depth > max {
        return Err(too_deep(path, max));
    }
    for (i, v) in l.values.iter().enumerate() {
        let len = path.len();
        path.push_str(&format!("[{i}]"));
        check_value(v, path, depth, max)?;
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

/// JSON text of a [`check`]ed Struct: numbers in their shortest exact form,
/// keys in the Struct's (sorted) order, a Value without a kind as `null`.
/// A non-finite number (which [`check`] refuses) would be written `null`.
pub fn to_json(s: &Struct) -> String {
    serde_json::to_string(&AsJson(s)).expect("a Struct always serialises")
}

/// A Struct that serialises as its JSON object (see [`to_json`]); put it in
/// `serde_json::json!` to embed the Struct exactly.
#[derive(Debug, Clone, Copy)]
pub struct AsJson<'a>(pub &'a Struct);

struct JsonValue<'a>(&'a Value);

impl Serialize for AsJson<'_> {
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
            Some(Kind::StructValue(s)) => AsJson(s).serialize(ser),
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

/// A JSON value as a protobuf Value: numbers become the nearest binary64
/// (exactly the double written, for text from [`to_json`] or `jsonb`),
/// `null` becomes `NULL_VALUE`.
pub fn value_from_json(v: &serde_json::Value) -> Value {
    let kind = match v {
        serde_json::Value::Null => Kind::NullValue(0),
        serde_json::Value::Bool(b) => Kind::BoolValue(*b),
        // (integers: `as f64` on the u64/i64 rounds to nearest, like the parser)
        serde_json::Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(f64::NAN)),
        serde_json::Value::String(s) => Kind::StringValue(s.clone()),
        serde_json::Value::Array(a) => {
            Kind::ListValue(ListValue { values: a.iter().map(value_from_json).collect() })
        }
        serde_json::Value::Object(o) => Kind::StructValue(from_json(o)),
    };
    Value { kind: Some(kind) }
}

/// A JSON object as a Struct (see [`value_from_json`]).
pub fn from_json(o: &serde_json::Map<String, serde_json::Value>) -> Struct {
    Struct { fields: o.iter().map(|(k, v)| (k.clone(), value_from_json(v))).collect() }
}

/// Parses JSON text that must hold an object into a Struct, exactly (see
/// the module docs). Errors say what is wrong, lowercase.
pub fn parse(text: &str) -> Result<Struct, String> {
    match serde_json::from_str::<serde_json::Value>(text) {
        Ok(serde_json::Value::Object(o)) => Ok(from_json(&o)),
        Ok(_) => Err("is not a JSON object".to_owned()),
        Err(e) => Err(format!("is not JSON: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn num(n: f64) -> Value {
        Value { kind: Some(Kind::NumberValue(n)) }
    }

    fn bits(v: &Value) -> u64 {
        match v.kind {
            Some(Kind::NumberValue(n)) => n.to_bits(),
            ref other => panic!("not a number: {other:?}"),
        }
    }

    #[test]
    fn numbers_read_back_as_the_same_double() {
        let xs = [
            123456789.12345679,
            123456789012345678901.0,
            f64::MAX,
            -f64::MAX,
            5e-324,
            f64::MIN_POSITIVE,
            -0.0,
            0.1 + 0.2,
            9_007_199_254_740_993.0,
            1e21,
            -1e-300,
        ];
        let s =
            Struct { fields: xs.iter().enumerate().map(|(i, x)| (format!("k{i:02}"), num(*x))).collect() };
        let back = parse(&to_json(&s)).unwrap();
        for (k, v) in &s.fields {
            assert_eq!(bits(&back.fields[k]), bits(v), "{k}: {}", to_json(&s));
        }
    }

    #[test]
    fn numbers_read_back_from_jsonb_text_without_exponents() {
        // what jsonb prints for numeric: plain digits, no exponent
        let max = format!("179769313486231570{}", "0".repeat(291));
        let tiny = format!("0.{}5", "0".repeat(323));
        let text = format!(
            r#"{{"max": {max}, "tiny": {tiny}, "a": 123456789.12345679, "b": 123456789012345680000}}"#
        );
        let s = parse(&text).unwrap();
        assert_eq!(bits(&s.fields["max"]), f64::MAX.to_bits());
        assert_eq!(bits(&s.fields["tiny"]), 5e-324_f64.to_bits());
        assert_eq!(bits(&s.fields["a"]), 123456789.12345679_f64.to_bits());
        assert_eq!(bits(&s.fields["b"]), 123456789012345678901.0_f64.to_bits());
    }

    #[test]
    fn strings_keep_unicode_and_escapes() {
        let s = Struct {
            fields: [(
                "k\"\\é".to_owned(),
                Value { kind: Some(Kind::StringValue("é\u{1F600}\"\\\n\u{1}".into())) },
            )]
            .into(),
        };
        let text = to_json(&s);
        assert_eq!(text, "{\"k\\\"\\\\é\":\"é\u{1F600}\\\"\\\\\\n\\u0001\"}");
        assert_eq!(parse(&text).unwrap(), s);
        assert!(parse("[1]").unwrap_err().contains("object"));
        assert!(parse("{").unwrap_err().contains("not JSON"));
    }

    #[test]
    fn check_names_the_path_of_what_json_cannot_hold() {
        let nan = Struct { fields: [("n n".to_owned(), num(f64::NAN))].into() };
        assert_eq!(check("doc", &nan, 5).unwrap_err().path, r#"doc["n n"]"#);
        let nul = Struct { fields: [("x\0".to_owned(), num(1.0))].into() };
        assert_eq!(check("doc", &nul, 5).unwrap_err().path, "doc");
        let mut deep = Struct::default();
        for _ in 0..3 {
            deep =
                Struct { fields: [("d".to_owned(), Value { kind: Some(Kind::StructValue(deep)) })].into() };
        }
        assert!(check("doc", &deep, 4).is_ok());
        assert!(check("doc", &deep, 3).unwrap_err().reason.contains("deeper than 3"));
    }
}
