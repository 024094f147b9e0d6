use kt_core::GgmlType;
use kt_formats::safetensors::MAX_HEADER_BYTES;
use kt_formats::{Dtype, FormatError, SafetensorsFile};

use crate::support::*;

fn parse(bytes: &[u8]) -> Result<SafetensorsFile, FormatError> {
    SafetensorsFile::from_bytes("w.safetensors", shared(bytes))
}

#[track_caller]
fn parse_err(bytes: &[u8], parts: &[&str]) -> FormatError {
    let e = match parse(bytes) {
        Ok(f) => panic!("expected an error containing {parts:?}, parsed {f:?}"),
        Err(e) => e,
    };
    assert_msg(&e, parts);
    e
}

fn sample() -> Vec<u8> {
    safetensors(&[
        ("model.embed_tokens.weight", "BF16", &[3, 4], pattern(24, 1)),
        ("model.norm.weight", "F32", &[4], pattern(16, 2)),
        ("lm_head.weight", "F16", &[2, 4], pattern(16, 3)),
        ("position_ids", "I64", &[2], pattern(16, 4)),
        ("scale", "F32", &[], pattern(4, 5)),
        ("q.weight", "F8_E4M3", &[2, 2], pattern(4, 6)),
        ("fp4", "F4", &[3, 2], pattern(3, 7)),
        ("future", "Q9_X", &[5], pattern(2, 8)),
        ("last", "F32", &[1], pattern(4, 9)),
    ])
}

#[test]
fn reads_tensors_and_refuses_unloadable_dtypes() {
    let bytes = sample();
    let f = parse(&bytes).unwrap();
    assert_eq!(f.data_start() % 8, 0);
    assert_eq!(f.tensor_names()[0], "model.embed_tokens.weight");
    assert_eq!(f.tensor_names().len(), 9);
    let e = f.tensor("model.embed_tokens.weight").unwrap();
    assert_eq!((e.ty, e.shape.clone()), (GgmlType::BF16, vec![3, 4]));
    assert_eq!(&*e.data, &pattern(24, 1)[..]);
    assert_eq!(f.tensor("model.norm.weight").unwrap().ty, GgmlType::F32);
    let h = f.tensor("lm_head.weight").unwrap();
    assert_eq!((h.ty, &*h.data), (GgmlType::F16, &pattern(16, 3)[..]));
    let s = f.tensor("scale").unwrap();
    assert_eq!((s.shape.len(), s.data.len()), (0, 4));
    for (name, dtype) in
        [("position_ids", "I64"), ("q.weight", "F8_E4M3"), ("fp4", "F4"), ("future", "Q9_X")]
    {
        let err = f.tensor(name).unwrap_err();
        assert!(matches!(err, FormatError::UnsupportedDtype { .. }));
        assert_msg(&err, &["w.safetensors", name, &format!("dtype {dtype}")]);
        assert!(f.tensor_bytes(name).is_ok());
    }
    assert_eq!(f.tensor_info("future").unwrap().dtype, Dtype::Other("Q9_X".into()));
    assert_msg(&f.tensor("nope").unwrap_err(), &["w.safetensors: no tensor named `nope`"]);
    assert!(!f.contains("__metadata__"));
}

#[test]
fn truncation_at_every_byte_is_an_error() {
    let bytes = sample();
    for len in 0..bytes.len() {
        match parse(&bytes[..len]) {
            Ok(_) => panic!("cut to {len} of {} bytes, parsed", bytes.len()),
            Err(e) => assert!(e.to_string().starts_with("w.safetensors: "), "{e}"),
        }
    }
}

#[test]
fn corrupting_any_byte_never_panics() {
    let bytes = sample();
    for at in 0..bytes.len() {
        for v in [0x00, b'9', b'"', b',', b'}', 0xff] {
            let mut b = bytes.clone();
            b[at] = v;
            if let Ok(f) = parse(&b) {
                touch_everything(&f);
            }
        }
    }
}

#[test]
fn header_problems_are_named() {
    let bytes = sample();

    let mut b = bytes.clone();
    put_u64(&mut b, 0, (bytes.len() - 8 + 1) as u64);
    parse_err(&b, &["JSON header of", "remain"]);

    let mut b = bytes.clone();
    put_u64(&mut b, 0, u64::MAX);
    parse_err(&b, &["header length 18446744073709551615 is over the 100000000-byte limit"]);
    put_u64(&mut b, 0, MAX_HEADER_BYTES + 1);
    parse_err(&b, &["over the"]);

    parse_err(&[1, 2, 3], &["header length needs 8 bytes"]);

    let e = parse_err(&safetensors_raw("{\"a\": {", &[]), &["w.safetensors: invalid JSON"]);
    assert!(matches!(e, FormatError::Json { .. }));
    parse_err(&safetensors_raw("[1, 2]", &[]), &["invalid JSON"]);
    parse_err(&safetensors_raw("\u{0}\u{0}", &[]), &["invalid JSON"]);
    let mut b = safetensors_raw("{}", &[]);
    b[8] = 0xff;
    parse_err(&b, &["invalid JSON"]);

    parse_err(
        &safetensors_raw(r#"{"a": {"dtype": "F32", "shape": [1]}}"#, &[0; 4]),
        &["tensor `a` has an invalid header entry", "data_offsets"],
    );
    parse_err(
        &safetensors_raw(
            r#"{"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}"#,
            &[0; 4],
        ),
        &["tensor `a` has an invalid header entry"],
    );
    parse_err(&safetensors_raw(r#"{"a": 7}"#, &[]), &["tensor `a` has an invalid header entry"]);

    // An empty file, and metadata only.
    assert!(parse(&safetensors_raw("{}", &[])).unwrap().tensor_names().is_empty());
    assert!(parse(&safetensors_raw(r#"{"__metadata__": {"x": "y"}}"#, &[])).is_ok());
}

#[test]
fn tensor_problems_are_named() {
    let t = |dtype: &str, shape: &str, offsets: &str, data_len: usize| {
        safetensors_raw(
            &format!(
                r#"{{"w": {{"dtype": "{dtype}", "shape": {shape}, "data_offsets": {offsets}}}}}"#
            ),
            &vec![0; data_len],
        )
    };
    parse(&t("F32", "[2, 2]", "[0, 16]", 16)).unwrap();
    parse_err(
        &t("F32", "[2, 2]", "[0, 16]", 15),
        &["tensor `w`", "data_offsets [0, 16) do not lie within the 15 data bytes"],
    );
    parse_err(&t("F32", "[2, 2]", "[8, 4]", 16), &["data_offsets [8, 4)"]);
    parse_err(&t("F32", "[2, 2]", "[0, 18446744073709551615]", 16), &["do not lie within"]);
    parse_err(&t("F32", "[2, 2]", "[0, 12]", 16), &["tensor `w` of dtype F32 and shape [2, 2] takes 16 bytes, but data_offsets [0, 12) hold 12"]);
    parse_err(&t("BF16", "[3]", "[0, 4]", 16), &["takes 6 bytes"]);
    parse_err(&t("F4", "[3]", "[0, 2]", 2), &["takes 2 bytes"]);
    parse_err(
        &t("F32", "[4294967296, 4294967296, 2]", "[0, 16]", 16),
        &["shape [4294967296, 4294967296, 2] has too many elements"],
    );
    parse_err(
        &t("F32", "[0, 18446744073709551615, 18446744073709551615]", "[0, 0]", 16),
        &["too many elements"],
    );
    // Empty, but its rows would be 2^64 bytes long (found by the fuzzer).
    parse_err(&t("F32", "[0, 4611686018427387904]", "[0, 0]", 0), &["too many elements"]);
    let z = parse(&t("F32", "[0, 7]", "[0, 0]", 0)).unwrap();
    assert_eq!(z.tensor("w").unwrap().data.len(), 0);
    // Unknown dtypes are not size-checked, but their offsets are.
    parse(&t("Q9", "[3]", "[0, 5]", 5)).unwrap();
    parse_err(&t("Q9", "[3]", "[0, 6]", 5), &["do not lie within"]);

    let overlap = safetensors_raw(
        r#"{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
            "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}"#,
        &[0; 12],
    );
    parse_err(&overlap, &["tensor `b` data [4, 12) overlaps tensor `a` at [0, 8)"]);
}
