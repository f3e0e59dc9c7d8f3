//! What a caller Puts is what every later Get and Query returns, bit for
//! bit: the doubles JSONB would round or lose the sign of, integers above
//! 2^53, unicode and escapes, deep nesting — fixed cases, then random
//! documents through PostgreSQL (primary and replica) and back.

use std::collections::BTreeMap;

use mesh_proto::data::{
    BatchOperation, BatchRequest, GetRequest, PutOperation, PutRequest, QueryRequest, batch_operation::Op,
};
use prost_types::{ListValue, Struct, Value, value::Kind};
use rand::{Rng, SeedableRng, rngs::StdRng};
use tonic::Code;

use crate::helpers::Fixture;

fn num(n: f64) -> Value {
    Value { kind: Some(Kind::NumberValue(n)) }
}

fn text(s: &str) -> Value {
    Value { kind: Some(Kind::StringValue(s.to_owned())) }
}

fn list(values: Vec<Value>) -> Value {
    Value { kind: Some(Kind::ListValue(ListValue { values })) }
}

fn object(fields: Vec<(&str, Value)>) -> Value {
    Value { kind: Some(Kind::StructValue(obj(fields))) }
}

fn obj(fields: Vec<(&str, Value)>) -> Struct {
    Struct { fields: fields.into_iter().map(|(k, v)| (k.to_owned(), v)).collect() }
}

/// Equal bit for bit: doubles compare by their bits (`-0.0 != 0.0`), and a
/// missing kind differs from null.
fn same(a: &Value, b: &Value) -> bool {
    match (&a.kind, &b.kind) {
        (Some(Kind::NumberValue(x)), Some(Kind::NumberValue(y))) => x.to_bits() == y.to_bits(),
        (Some(Kind::StructValue(x)), Some(Kind::StructValue(y))) => same_struct(x, y),
        (Some(Kind::ListValue(x)), Some(Kind::ListValue(y))) => {
            x.values.len() == y.values.len() && x.values.iter().zip(&y.values).all(|(a, b)| same(a, b))
        }
        (x, y) => x == y,
    }
}

fn same_struct(a: &Struct, b: &Struct) -> bool {
    a.fields.len() == b.fields.len()
        && a.fields.iter().zip(&b.fields).all(|((ka, va), (kb, vb))| ka == kb && same(va, vb))
}

fn nest(depth: usize) -> Struct {
    let mut s = obj(vec![("leaf", num(-0.0))]);
    for _ in 1..depth {
        s = obj(vec![("n", Value { kind: Some(Kind::StructValue(s)) })]);
    }
    s
}

fn tricky() -> Struct {
    obj(vec![
        ("a", num(123456789.12345679)),
        ("b", num(0.30000000000000004)),
        ("max", num(f64::MAX)),
        ("min", num(-f64::MAX)),
        ("tiny", num(5e-324)),
        ("neg_zero", num(-0.0)),
        ("zero", num(0.0)),
        ("big", num(123456789012345678901.0)),
        ("above_2_53", num(9007199254740993.0)),
        ("two_53_plus_2", num(9007199254740994.0)),
        ("third", num(1.0 / 3.0)),
        ("unicode", text("é ü ß 中文 😀 \u{10FFFF} \u{2028}\u{2029} \u{FEFF}")),
        ("escapes", text("\" \\ / \n \r \t \u{1} \u{1f} \u{7f} </script>")),
        ("", text("an empty field name")),
        ("fïeld ☃ with \"quotes\"", num(1.0)),
        ("empties", list(vec![text(""), object(vec![]), list(vec![])])),
        (
            "kinds",
            list(vec![
                Value { kind: Some(Kind::NullValue(0)) },
                Value { kind: Some(Kind::BoolValue(true)) },
                Value { kind: None },
            ]),
        ),
        ("deep", Value { kind: Some(Kind::StructValue(nest(mesh_data::MAX_DEPTH - 1))) }),
    ])
}

#[tokio::test]
async fn tricky_values_round_trip_exactly_through_get_and_query() {
    let _t = mesh_testkit::init_telemetry();
    let f = Fixture::new("dave").await;
    let c = &f.c;
    let d = tricky();
    let put = c
        .put(PutRequest {
            collection: "exact".into(),
            key: "k".into(),
            document: Some(d.clone()),
            expected_version: None,
        })
        .await
        .unwrap();

    let got = c.get(GetRequest {
        collection: "exact".into(),
        key: "k".into(),
        consistency_token: put.consistency_token.clone(),
    });
    let got = got.await.unwrap().document.unwrap();
    assert!(same_struct(&got, &d), "Get changed the document:\n{got:#?}");

    // A filter on an exact double finds it; the page returns it exactly too.
    for (field, n) in
        [("a", 123456789.12345679), ("b", 0.30000000000000004), ("max", f64::MAX), ("tiny", 5e-324)]
    {
        let q = c
            .query(QueryRequest {
                collection: "exact".into(),
                filter: Some(obj(vec![(field, num(n))])),
                consistency_token: put.consistency_token.clone(),
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(q.documents.len(), 1, "filter on {field}");
        assert!(same_struct(q.documents[0].document.as_ref().unwrap(), &d));
    }
    // A neighbouring double is another number.
    let q = c
        .query(QueryRequest {
            collection: "exact".into(),
            filter: Some(obj(vec![("b", num(0.3))])),
            consistency_token: put.consistency_token,
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(q.documents.is_empty());

    // One level deeper than allowed is refused, naming where.
    let s = c.put(PutRequest {
        collection: "exact".into(),
        key: "deeper".into(),
        document: Some(nest(mesh_data::MAX_DEPTH + 1)),
        expected_version: None,
    });
    let s = s.await.unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument);
    assert!(s.message().contains("nests deeper than"), "{}", s.message());
}

/// A random finite double from random bits: every exponent, subnormals, both zeros.
fn double(rng: &mut StdRng) -> f64 {
    loop {
        let n = match rng.random_range(0..4) {
            0 => f64::from_bits(rng.random()),
            1 => rng.random_range(-1e6..1e6),
            2 => (rng.random::<i64>() as f64) * if rng.random() { 1.0 } else { 1e3 },
            _ => [0.0, -0.0, f64::MAX, f64::MIN, f64::MIN_POSITIVE, 5e-324, -5e-324, 2f64.powi(53) + 2.0]
                [rng.random_range(0..8)],
        };
        if n.is_finite() {
            return n;
        }
    }
}

fn string(rng: &mut StdRng) -> String {
    const PIECES: &[&str] = &[
        "a",
        "Z",
        " ",
        "\"",
        "\\",
        "/",
        "\n",
        "\t",
        "\u{1}",
        "\u{7f}",
        "é",
        "中",
        "😀",
        "\u{10FFFF}",
        "\u{2028}",
        "{",
        "}",
        "[",
        "'",
    ];
    (0..rng.random_range(0..12)).map(|_| PIECES[rng.random_range(0..PIECES.len())]).collect()
}

fn random_value(rng: &mut StdRng, depth: usize) -> Value {
    let leaf = depth >= 6 || rng.random_bool(0.6);
    let kind = if leaf {
        match rng.random_range(0..5) {
            0 => Kind::NullValue(0),
            1 => Kind::BoolValue(rng.random()),
            2 | 3 => Kind::NumberValue(double(rng)),
            _ => Kind::StringValue(string(rng)),
        }
    } else if rng.random() {
        Kind::StructValue(random_struct(rng, depth + 1))
    } else {
        Kind::ListValue(ListValue {
            values: (0..rng.random_range(0..5)).map(|_| random_value(rng, depth + 1)).collect(),
        })
    };
    Value { kind: Some(kind) }
}

fn random_struct(rng: &mut StdRng, depth: usize) -> Struct {
    let fields: BTreeMap<String, Value> =
        (0..rng.random_range(0..6)).map(|_| (string(rng), random_value(rng, depth))).collect();
    Struct { fields }
}

#[tokio::test]
async fn random_documents_round_trip_exactly() {
    let _t = mesh_testkit::init_telemetry();
    let f = Fixture::new("erin").await;
    let c = &f.c;
    let seed: u64 =
        std::env::var("MESH_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random);
    eprintln!("seed {seed} (set MESH_TEST_SEED to repeat)");
    let mut rng = StdRng::seed_from_u64(seed);
    let docs: Vec<(String, Struct)> =
        (0..400).map(|i| (format!("d{i:04}"), random_struct(&mut rng, 1))).collect();

    let mut token = String::new();
    for chunk in docs.chunks(200) {
        let ops = chunk
            .iter()
            .map(|(k, d)| BatchOperation {
                op: Some(Op::Put(PutOperation {
                    collection: "rand".into(),
                    key: k.clone(),
                    document: Some(d.clone()),
                    expected_version: Some(0),
                })),
            })
            .collect();
        token = c.batch(BatchRequest { ops }).await.unwrap().consistency_token;
    }
    // One by one (served by a replica once it has replayed the token, else the primary)…
    let mut served = BTreeMap::new();
    for (k, d) in &docs {
        let req = c.authorize(GetRequest {
            collection: "rand".into(),
            key: k.clone(),
            consistency_token: token.clone(),
        });
        let resp = c.raw().get(req).await.unwrap();
        *served.entry(crate::helpers::served_by(&resp)).or_insert(0) += 1;
        let got = resp.into_inner().document.unwrap();
        assert!(same_struct(&got, d), "seed {seed}, {k}: sent\n{d:#?}\ngot\n{got:#?}");
    }
    eprintln!("reads served by {served:?}");
    // …and in pages.
    let mut page_token = String::new();
    let mut seen = 0;
    loop {
        let q = c
            .query(QueryRequest {
                collection: "rand".into(),
                page_size: 150,
                page_token,
                consistency_token: token.clone(),
                ..Default::default()
            })
            .await
            .unwrap();
        for d in &q.documents {
            let (_, want) = &docs[seen];
            assert_eq!(d.key, docs[seen].0, "keys in order");
            assert!(same_struct(d.document.as_ref().unwrap(), want), "seed {seed}, {}", d.key);
            seen += 1;
        }
        if q.next_page_token.is_empty() {
            break;
        }
        page_token = q.next_page_token;
    }
    assert_eq!(seen, docs.len());
}
