//! JSON to `google.protobuf.Struct`, for tests and benchmarks that write
//! documents: the services' own conversion ([`mesh_proto::json`]; numbers
//! become doubles, as protobuf has them).

use prost_types::Struct;

/// A Struct from a JSON object; panics on anything else (a test's mistake).
pub fn object(v: serde_json::Value) -> Struct {
    match v {
        serde_json::Value::Object(o) => mesh_proto::json::from_json(&o),
        other => panic!("not a JSON object: {other}"),
    }
}
