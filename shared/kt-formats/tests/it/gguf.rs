use kt_core::GgmlType;
use kt_formats::gguf::writer::GgufWriter;
use kt_formats::gguf::{DEFAULT_ALIGNMENT, MAX_ARRAY_NESTING};
use kt_formats::{Array, FormatError, GgufFile, Value, ValueType};

use crate::support::*;

#[test]
fn round_trips_every_value_type_and_tensor() {
    for version in [2, 3] {
        let mut w = small_writer();
        w.version(version);
        let bytes = w.to_bytes();
        assert_eq!(bytes.len() as u64, w.file_len());
        let buf = shared(&bytes);
        let f = GgufFile::from_bytes("rt.gguf", buf.clone()).unwrap();
        assert_eq!(f.version, version);
        assert_eq!(f.alignment, DEFAULT_ALIGNMENT);
        assert_eq!(f.data_start() % 32, 0);
        let m = f.metadata();
        assert_eq!(m.len(), 20);
        assert_eq!(m.keys().next(), Some("general.architecture"));
        assert_eq!(f.arch(), Some("llama"));
        assert_eq!(m.get_str("general.name"), Some("tiny ünïcode"));
        assert_eq!(m.get("v.u8"), Some(&Value::U8(200)));
        assert_eq!(m.get("v.i8"), Some(&Value::I8(-100)));
        assert_eq!(m.get("v.u16"), Some(&Value::U16(60000)));
        assert_eq!(m.get("v.i16"), Some(&Value::I16(-30000)));
        assert_eq!(m.get("v.u32"), Some(&Value::U32(4_000_000_000)));
        assert_eq!(m.get("v.i32"), Some(&Value::I32(-2_000_000_000)));
        assert_eq!(m.get("v.f32"), Some(&Value::F32(1.5)));
        assert_eq!(m.get_bool("v.bool"), Some(true));
        assert_eq!(m.get_str("v.string"), Some(""));
        assert_eq!(m.get("v.u64"), Some(&Value::U64(u64::MAX)));
        assert_eq!(m.get("v.i64"), Some(&Value::I64(i64::MIN)));
        assert_eq!(m.get("v.f64"), Some(&Value::F64(-2.25)));
        assert_eq!(m.arch_get("block_count").and_then(Value::as_u64), Some(2));
        let tokens = m.get_array("tokenizer.ggml.tokens").unwrap();
        assert_eq!(tokens.as_strings().unwrap().to_vec(), ["<s>", "</s>", "hello", ""]);
        assert_eq!(tokens.as_strings().unwrap().get(1), Some("</s>"));
        assert_eq!(tokens.as_strings().unwrap().get(4), None);
        assert_eq!(
            m.get_array("tokenizer.ggml.scores").unwrap().as_f32s(),
            Some(&[0.0, -1.0, -2.5, 3.0][..])
        );
        assert_eq!(m.get_array("v.bools"), Some(&Array::Bool(vec![true, false])));
        let empty = m.get_array("v.empty").unwrap();
        assert!(empty.is_empty());
        assert_eq!(empty.elem_type(), ValueType::U32);
        let nested = m.get_array("v.nested").unwrap().as_arrays().unwrap();
        assert_eq!(nested[0].to_i64s(), Some(vec![1, -2]));
        assert_eq!(nested[1].as_arrays().unwrap()[0].as_strings().unwrap().to_vec(), ["deep"]);
        assert_eq!(nested[2], Array::F64(vec![]));

        let names = f.tensor_names();
        assert_eq!(names, ["token_embd.weight", "blk.0.attn_q.weight", "output.weight"]);
        let t = f.tensor("token_embd.weight").unwrap();
        assert_eq!((t.ty, t.shape.clone()), (GgmlType::F32, vec![2, 3]));
        assert_eq!(&*t.data, &pattern(24, 1)[..]);
        let q = f.tensor("blk.0.attn_q.weight").unwrap();
        assert_eq!((q.ty, q.shape.clone()), (GgmlType::Q8_0, vec![2, 32]));
        assert_eq!(&*q.data, &pattern(68, 2)[..]);
        let info = f.tensor_info("output.weight").unwrap();
        assert_eq!(info.ne(), [256, 1]);
        assert_eq!(info.n_bytes, 144);
        assert_eq!(info.offset % 32, 0);
        // Zero-copy: the tensor's bytes lie inside the buffer the file was parsed from.
        let o = f.tensor("output.weight").unwrap();
        let range = buf.as_ptr_range();
        assert!(range.contains(&o.data.as_ptr()));
        assert_eq!(
            o.data.as_ptr() as usize,
            buf.as_ptr() as usize + f.data_start() + info.offset as usize
        );
    }
}

#[test]
fn value_accessors_coerce_sensibly() {
    assert_eq!(Value::U8(7).as_u64(), Some(7));
    assert_eq!(Value::U8(7).as_i64(), Some(7));
    assert_eq!(Value::U8(7).as_f64(), Some(7.0));
    assert_eq!(Value::U8(7).as_f32(), Some(7.0));
    assert_eq!(Value::I32(-1).as_u64(), None);
    assert_eq!(Value::I32(-1).as_i64(), Some(-1));
    assert_eq!(Value::I16(5).as_u64(), Some(5));
    assert_eq!(Value::U64(u64::MAX).as_i64(), None);
    assert_eq!(Value::U64(1 << 40).as_u32(), None);
    assert_eq!(Value::U64(1 << 20).as_u32(), Some(1 << 20));
    assert_eq!(Value::I64(-3).as_f64(), Some(-3.0));
    assert_eq!(Value::F64(0.1).as_f32(), Some(0.1f32));
    assert_eq!(Value::F32(2.0).as_u64(), None);
    assert_eq!(Value::Bool(true).as_u64(), None);
    assert_eq!(Value::U8(1).as_bool(), None);
    assert_eq!(Value::String("x".into()).as_str(), Some("x"));
    assert_eq!(Value::U32(1).as_str(), None);
    assert!(Value::U32(1).as_array().is_none());
    let a = Array::from(vec![1u16, 2]);
    assert_eq!(a.to_u64s(), Some(vec![1, 2]));
    assert_eq!(a.to_f32s(), Some(vec![1.0, 2.0]));
    assert_eq!(Array::from(vec![-1i8]).to_u64s(), None);
    assert_eq!(Array::from(vec!["a"]).to_f64s(), None);
    assert_eq!(a.get(1), Some(Value::U16(2)));
    assert_eq!(a.get(2), None);
    assert_eq!(Value::Array(Array::from(vec![0u8; 3])).to_string(), "[u8; 3]");
}

#[test]
fn custom_alignment_is_honoured() {
    for align in [1u32, 8, 64, 4096] {
        let mut w = small_writer();
        w.alignment(align);
        let f = parse(&w.to_bytes()).unwrap();
        assert_eq!(f.alignment, u64::from(align));
        assert_eq!(f.data_start() % align as usize, 0);
        for info in f.tensor_infos() {
            assert_eq!(info.offset % u64::from(align), 0);
            f.tensor(&info.name).unwrap();
        }
        assert_eq!(f.metadata().get_u32("general.alignment"), Some(align));
    }
}

#[test]
fn a_file_without_tensors_may_end_before_its_data_section() {
    let mut w = GgufWriter::new();
    w.metadata("general.architecture", "x");
    let mut bytes = w.to_bytes();
    // Drop the padding: nothing lives in the data section, so nothing is out of bounds.
    bytes.truncate(24 + 8 + 20 + 4 + 8 + 1);
    let f = parse(&bytes).unwrap();
    assert!(f.tensor_infos().is_empty());
    assert_eq!(f.arch(), Some("x"));
}

#[test]
fn a_150k_token_vocabulary_parses_quickly() {
    let n = 151_936;
    let tokens: Vec<String> = (0..n).map(|i| format!("tok{i}")).collect();
    let mut w = GgufWriter::new();
    w.metadata("tokenizer.ggml.tokens", Array::from(tokens.clone()))
        .metadata("tokenizer.ggml.scores", Array::F32((0..n).map(|i| i as f32).collect()))
        .metadata("tokenizer.ggml.token_type", Array::I32(vec![1; n]));
    let bytes = w.to_bytes();
    let t0 = std::time::Instant::now();
    let f = parse(&bytes).unwrap();
    eprintln!("parsed {n} tokens ({} bytes) in {:?}", bytes.len(), t0.elapsed());
    let m = f.metadata();
    assert_eq!(
        m.get_array("tokenizer.ggml.tokens").unwrap().as_strings().unwrap().to_vec(),
        tokens
    );
    assert_eq!(m.get_array("tokenizer.ggml.scores").unwrap().len(), n);
    assert_eq!(m.get_array("tokenizer.ggml.token_type").unwrap().as_i32s().unwrap()[n - 1], 1);
}

#[test]
fn truncation_at_every_byte_is_an_error() {
    let bytes = small_writer().to_bytes();
    parse(&bytes).unwrap();
    for len in 0..bytes.len() {
        match parse(&bytes[..len]) {
            Ok(_) => panic!("a file cut to {len} of {} bytes parsed", bytes.len()),
            Err(e) => assert!(e.to_string().starts_with("test.gguf: "), "{e}"),
        }
    }
}

#[test]
fn corrupting_any_byte_never_panics() {
    let bytes = small_writer().to_bytes();
    let mut ok = 0;
    for at in 0..bytes.len() {
        for v in [0x00, 0x01, 0x07, 0x7f, 0x80, 0xff] {
            let mut b = bytes.clone();
            b[at] = v;
            if let Ok(f) = parse(&b) {
                ok += 1;
                touch_everything(&f);
                touch_metadata(&f);
            }
        }
    }
    // Most corruptions land in tensor data or string contents and still parse.
    assert!(ok > 0);
}

#[test]
fn not_gguf_and_unsupported_versions_are_named() {
    let bytes = small_writer().to_bytes();
    let mut b = bytes.clone();
    b[..4].copy_from_slice(b"GGML");
    assert!(matches!(
        parse_err(&b, &["test.gguf", "not a GGUF file"]),
        FormatError::NotGguf { .. }
    ));
    parse_err(b"PK\x03", &["not a GGUF file"]);
    parse_err(b"", &["magic", "needs 4 bytes"]);
    parse_err(b"GG", &["magic"]);

    for (version, expect) in [
        (1u32, "version 1"),
        (0, "kt reads versions 2 and 3"),
        (4, "kt reads versions 2 and 3"),
        (0x0300_0000, "big-endian"),
    ] {
        let mut b = bytes.clone();
        put_u32(&mut b, 4, version);
        let e = parse_err(&b, &["test.gguf", "unsupported GGUF version", expect]);
        assert!(matches!(e, FormatError::UnsupportedVersion { .. }));
    }
}

#[test]
fn absurd_counts_and_lengths_are_errors_not_allocations() {
    let bytes = small_writer().to_bytes();

    let mut b = bytes.clone();
    put_u64(&mut b, 8, u64::MAX);
    parse_err(&b, &["18446744073709551615 tensor descriptions", "remain"]);

    let mut b = bytes.clone();
    put_u64(&mut b, 16, u64::MAX);
    parse_err(&b, &["18446744073709551615 metadata pairs"]);

    let mut b = bytes.clone();
    put_u64(&mut b, 8, 1 << 40);
    put_u64(&mut b, 16, 1 << 40);
    parse_err(&b, &["metadata pairs"]);

    // The first key's length.
    let mut b = bytes.clone();
    put_u64(&mut b, 24, u64::MAX);
    parse_err(&b, &["at byte 24: metadata key (length 18446744073709551615) needs"]);

    // A string value's length.
    let mut b = bytes.clone();
    let at = kv_type_pos(&b, "general.name") + 4;
    put_u64(&mut b, at, u64::MAX - 3);
    parse_err(&b, &["metadata `general.name`: string (length 18446744073709551612)"]);

    // Array counts, for fixed-size, string and array elements.
    for (key, what) in [
        ("tokenizer.ggml.scores", "array of 18446744073709551615 f32 values"),
        ("tokenizer.ggml.tokens", "array of 18446744073709551615 string values"),
        ("v.nested", "array of 18446744073709551615 array values"),
        ("v.bools", "array of 18446744073709551615 bool values"),
    ] {
        let mut b = bytes.clone();
        let at = kv_type_pos(&b, key) + 4 + 4;
        put_u64(&mut b, at, u64::MAX);
        parse_err(&b, &[key, what]);
        // Just past the remaining bytes is as wrong as u64::MAX.
        let remain = (b.len() - at - 8) as u64;
        put_u64(&mut b, at, remain + 1);
        parse_err(&b, &[key]);
    }

    // A string inside an array.
    let mut b = bytes.clone();
    let at = kv_type_pos(&b, "tokenizer.ggml.tokens") + 4 + 4 + 8;
    put_u64(&mut b, at, 1 << 62);
    parse_err(&b, &["tokenizer.ggml.tokens", "string in array (length 4611686018427387904)"]);

    // A tensor name's length.
    let mut b = bytes.clone();
    let at = tensor_info_fields(&b, "token_embd.weight") - "token_embd.weight".len() - 8;
    put_u64(&mut b, at, u64::MAX);
    parse_err(&b, &["tensor name (length 18446744073709551615)"]);
}

#[test]
fn array_nesting_is_bounded() {
    fn nest(depth: usize) -> Array {
        let mut a = Array::from(vec![1u8]);
        for _ in 1..depth {
            a = Array::Array(vec![a]);
        }
        a
    }
    let mut w = GgufWriter::new();
    w.metadata("ok", nest(MAX_ARRAY_NESTING));
    let f = parse(&w.to_bytes()).unwrap();
    assert_eq!(f.metadata().get_array("ok"), Some(&nest(MAX_ARRAY_NESTING)));

    let mut w = GgufWriter::new();
    w.metadata("deep", nest(MAX_ARRAY_NESTING + 1));
    parse_err(&w.to_bytes(), &["metadata `deep`", "nested more than 8 deep"]);

    // A hand-made file claiming 1000 levels: must stop at the bound, not recurse 1000 deep.
    let mut b = GgufWriter::new().to_bytes();
    put_u64(&mut b, 16, 1);
    b.truncate(24);
    b.extend_from_slice(&1u64.to_le_bytes());
    b.push(b'k');
    b.extend_from_slice(&9u32.to_le_bytes());
    for _ in 0..1000 {
        b.extend_from_slice(&9u32.to_le_bytes());
        b.extend_from_slice(&1u64.to_le_bytes());
    }
    parse_err(&b, &["nested more than"]);
}

#[test]
fn malformed_values_are_named() {
    let bytes = small_writer().to_bytes();

    let mut b = bytes.clone();
    let at = kv_type_pos(&b, "v.u32");
    put_u32(&mut b, at, 13);
    parse_err(&b, &["metadata `v.u32` has unknown value type 13"]);

    let mut b = bytes.clone();
    let at = kv_type_pos(&b, "v.empty") + 4;
    put_u32(&mut b, at, 99);
    parse_err(&b, &["metadata `v.empty`", "unknown element type 99"]);

    let mut b = bytes.clone();
    let at = kv_type_pos(&b, "v.bool") + 4;
    b[at] = 2;
    parse_err(&b, &["metadata `v.bool`", "bool value 2 is neither 0 nor 1"]);

    let mut b = bytes.clone();
    let at = kv_type_pos(&b, "v.bools") + 4 + 4 + 8;
    b[at + 1] = 9;
    parse_err(&b, &[&format!("at byte {}", at + 1), "bool value 9"]);

    let mut b = bytes.clone();
    let at = find(&b, b"v.u8");
    b[at] = 0xff;
    parse_err(&b, &["metadata key", "is not UTF-8"]);

    let mut w = GgufWriter::new();
    w.metadata("a", 1u8).metadata("b", 2u8).metadata("a", 3u8);
    parse_err(&w.to_bytes(), &["metadata key `a` appears twice"]);

    // An invalid byte inside a string value is replaced, not fatal.
    let mut b = bytes.clone();
    let at = find(&b, b"hello");
    b[at] = 0xff;
    let f = parse(&b).unwrap();
    assert_eq!(
        f.metadata()
            .get_array("tokenizer.ggml.tokens")
            .unwrap()
            .as_strings()
            .unwrap()
            .get(2)
            .unwrap(),
        "\u{fffd}ello"
    );
}

#[test]
fn strings_split_inside_a_character_are_each_replaced() {
    // Concatenated, "a\xc3" + "\xa9b" is the valid "aéb"; on their own both are invalid.
    let mut w = GgufWriter::new();
    w.metadata("t", Array::from(vec!["ok", "aX", "Yb", "é"]));
    let mut b = w.to_bytes();
    let x = find(&b, b"aX") + 1;
    b[x] = 0xc3;
    let y = find(&b, b"Yb");
    b[y] = 0xa9;
    let f = parse(&b).unwrap();
    let t = f.metadata().get_array("t").unwrap().as_strings().unwrap();
    assert_eq!(t.to_vec(), ["ok", "a\u{fffd}", "\u{fffd}b", "é"]);
    assert_eq!(t.iter().len(), 4);
    assert_eq!(t.get(3), Some("é"));
}

#[test]
fn bad_alignment_values_are_errors() {
    for (v, shown) in [
        (Value::U32(0), "is 0 (u32)"),
        (Value::U32(3), "is 3 (u32)"),
        (Value::I32(-32), "-32"),
        (Value::String("32".into()), "string"),
    ] {
        let mut w = small_writer();
        w.metadata("general.alignment", v);
        parse_err(&w.to_bytes(), &["general.alignment", shown, "nonzero power of two"]);
    }
    // Any unsigned integer type is accepted.
    let mut w = GgufWriter::new();
    w.metadata("general.alignment", 16u64);
    assert_eq!(parse(&w.to_bytes()).unwrap().alignment, 16);
}

#[test]
fn bad_tensor_descriptions_are_named() {
    let bytes = small_writer().to_bytes();
    let q = "blk.0.attn_q.weight";
    // n_dims, ne[0], ne[1], type, offset
    let fields = tensor_info_fields(&bytes, q);
    let (ne0, ne1, ty, off) = (fields + 4, fields + 12, fields + 20, fields + 24);

    for id in [4u32, 31, 1000, u32::MAX] {
        let mut b = bytes.clone();
        put_u32(&mut b, ty, id);
        let e = parse_err(&b, &["test.gguf", q, &format!("unknown GGML type id {id}")]);
        assert!(matches!(e, FormatError::BadTensor { .. }));
    }

    let mut b = bytes.clone();
    let o = u64::from_le_bytes(b[off..off + 8].try_into().unwrap());
    put_u64(&mut b, off, o + 4);
    parse_err(&b, &[q, &format!("data offset {} is not a multiple of the alignment 32", o + 4)]);

    let mut b = bytes.clone();
    put_u64(&mut b, off, !31u64);
    parse_err(&b, &[q, "ends past the end of the file"]);

    let mut b = bytes.clone();
    put_u64(&mut b, ne0, 1 << 31);
    put_u64(&mut b, ne1, 1 << 31);
    parse_err(&b, &[q, "ends past the end of the file"]);

    let mut b = bytes.clone();
    put_u64(&mut b, ne0, 1 << 40);
    put_u64(&mut b, ne1, 1 << 40);
    parse_err(&b, &[q, "product overflows 64 bits"]);

    // A zero dimension must not hide the overflow of the others.
    let mut w = GgufWriter::new();
    w.tensor("z", GgmlType::F32, vec![1, 1, 0], vec![]).unwrap();
    let mut b = w.to_bytes();
    let zf = tensor_info_fields(&b, "z");
    put_u64(&mut b, zf + 12, u64::MAX);
    put_u64(&mut b, zf + 20, u64::MAX);
    parse_err(&b, &["`z`", "product overflows"]);
    put_u64(&mut b, zf + 12, 5);
    put_u64(&mut b, zf + 20, 1 << 40);
    let f = parse(&b).unwrap();
    let z = f.tensor("z").unwrap();
    assert_eq!(z.shape, [1 << 40, 5, 0]);
    assert_eq!((z.rows(), z.row_bytes(), z.row(0)), (5 << 40, 0, Some(&[][..])));
    // Empty, but a row would take 2^64 bytes: row arithmetic would overflow (found by the
    // fuzzer through `WeightTensor::row`).
    put_u64(&mut b, zf + 4, 1 << 62);
    put_u64(&mut b, zf + 12, 0);
    put_u64(&mut b, zf + 20, 1);
    parse_err(&b, &["`z`", "[4611686018427387904, 0, 1] of type f32 take too many bytes"]);

    let mut b = bytes.clone();
    put_u64(&mut b, ne0, 40);
    parse_err(&b, &[q, "rows of 40 elements, not a whole number of q8_0 blocks of 32"]);

    let mut w = GgufWriter::new();
    w.tensor("five", GgmlType::F32, vec![1, 1, 1, 1, 2], vec![0; 8]).unwrap();
    parse_err(&w.to_bytes(), &["`five` has 5 dimensions; GGML tensors have at most 4"]);
    let mut b = bytes.clone();
    put_u32(&mut b, fields, u32::MAX);
    parse_err(&b, &[q, "4294967295 dimensions"]);

    let mut w = GgufWriter::new();
    w.tensor("a", GgmlType::F32, vec![1], vec![0; 4]).unwrap();
    w.tensor("b", GgmlType::F32, vec![1], vec![0; 4]).unwrap();
    w.tensor("a", GgmlType::F32, vec![1], vec![0; 4]).unwrap();
    parse_err(&w.to_bytes(), &["tensor `a` is described twice"]);

    let mut b = bytes.clone();
    b[fields - 3] = 0xc3;
    parse_err(&b, &["tensor name", "is not UTF-8"]);
}

#[test]
fn tensor_past_the_end_names_range_and_file_size() {
    let mut w = GgufWriter::new();
    w.tensor("blk.0.attn_q.weight", GgmlType::F32, vec![4, 4], vec![0; 64]).unwrap();
    let bytes = w.to_bytes();
    let cut = &bytes[..bytes.len() - 1];
    let start = bytes.len() - 64;
    let e = parse_err(cut, &[]);
    assert_eq!(
        e.to_string(),
        format!(
            "test.gguf: tensor `blk.0.attn_q.weight` data [{start}..{}) ends past the end of the file ({} bytes)",
            bytes.len(),
            cut.len()
        )
    );
}

#[test]
fn missing_tensor_and_missing_file_are_named() {
    let f = parse(&small_writer().to_bytes()).unwrap();
    let e = f.tensor("blk.9.ffn_up.weight").unwrap_err();
    assert_eq!(e.to_string(), "test.gguf: no tensor named `blk.9.ffn_up.weight`");
    assert!(!f.contains("blk.9.ffn_up.weight"));
    assert!(f.contains("output.weight"));

    let dir = TempDir::new("missing");
    let p = dir.join("nope.gguf");
    let e = GgufFile::open(&p).unwrap_err();
    assert!(matches!(e, FormatError::Io { .. }));
    assert_msg(&e, &["nope.gguf"]);
}

#[test]
fn open_maps_the_file() {
    let dir = TempDir::new("open");
    let w = small_writer();
    let p = dir.join("m.gguf");
    w.write(&p).unwrap();
    assert_eq!(std::fs::read(&p).unwrap(), w.to_bytes());
    let f = GgufFile::open(&p).unwrap();
    assert_eq!(f.name(), p.display().to_string());
    assert_eq!(&*f.tensor("token_embd.weight").unwrap().data, &pattern(24, 1)[..]);

    let empty = dir.write("empty.gguf", b"");
    assert_msg(&GgufFile::open(&empty).unwrap_err(), &["empty.gguf", "magic"]);
}

#[test]
fn zero_tensors_are_sparse_holes() {
    let dir = TempDir::new("sparse");
    let mut w = GgufWriter::new();
    w.zero_tensor("big", GgmlType::Q4_K, vec![4096, 4096]).unwrap();
    w.tensor("small", GgmlType::F16, vec![2], vec![1, 2, 3, 4]).unwrap();
    let p = dir.join("sparse.gguf");
    w.write(&p).unwrap();
    let f = GgufFile::open(&p).unwrap();
    let big = f.tensor("big").unwrap();
    assert_eq!(big.data.len(), 4096 * 16 * 144);
    assert!(big.data.iter().step_by(4096).all(|&b| b == 0));
    assert_eq!(&*f.tensor("small").unwrap().data, &[1, 2, 3, 4]);
}

/// Inputs the fuzzer once crashed on (see `fuzz/README.md`): each must parse or fail cleanly,
/// and every tensor of a parsed one must allow all of `WeightTensor`'s arithmetic.
#[test]
fn fuzz_regressions() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data");
    let mut n = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if !path.file_name().unwrap().to_str().unwrap().starts_with("fuzz-") {
            continue;
        }
        n += 1;
        let Ok(f) = GgufFile::open(&path) else { continue };
        touch_metadata(&f);
        for info in f.tensor_infos() {
            let t = f.tensor(&info.name).unwrap();
            let _ = (t.numel(), t.rows(), t.row_len(), t.row_bytes(), t.row(0), t.row(usize::MAX));
        }
    }
    assert!(n > 0);
}
