//! JSON to `google.protobuf.Struct`, for tests and benchmarks that write
//! documents (numbers become doubles, as protobuf has them).

use prost_types::{ListValue, Struct, Value, value::Kind};

/// A protobuf Value from JSON.
pub fn value(v: serde_json::Value) -> Value {
    let kind = match v {
        serde_json::Value::Null => Kind::NullValue(0),
        serde_json::Value::Bool(b) => Kind::BoolValue(b),
        serde_json::Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or_default()),
        serde_json::Value::String(s) => Kind::StringValue(s),
        serde_json::Value::Array(a) => {
            Kind::ListValue(ListValue { values: a.into_iter().map(value).collect() })
        }
        serde_json::Value::Object(o) => {
            Kind::StructValue(Struct { fields: o.into_iter().map(|(k, v)| (k, value(v))).collect() })
        }
    };
    Value { kind: Some(kind) }
}

/// A Struct from a JSON object; panics on anything else (a test's mistake).
pub fn object(v: serde_json::Value) -> Struct {
    match value(v).kind {
        Some(Kind::StructValue(s)) => s,
        other => panic!("not a JSON object: {other:?}"),
    }
}
