//! Builders for synthetic files and helpers to corrupt them.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use kt_core::{GgmlType, SharedBytes};
use kt_formats::gguf::writer::GgufWriter;
use kt_formats::{Array, FormatError, GgufFile, TensorSource, Value};

/// A fresh folder under the system temp dir, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("kt-formats-{}-{tag}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    pub fn write(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let p = self.join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Deterministic filler bytes.
pub fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
}

/// A small valid file exercising every value type, nested arrays and a few tensor types. Its
/// last tensor is not empty, so cutting off any byte makes the file invalid.
pub fn small_writer() -> GgufWriter {
    let mut w = GgufWriter::new();
    w.metadata("general.architecture", "llama")
        .metadata("general.name", "tiny ünïcode")
        .metadata("v.u8", 200u8)
        .metadata("v.i8", -100i8)
        .metadata("v.u16", 60000u16)
        .metadata("v.i16", -30000i16)
        .metadata("v.u32", 4_000_000_000u32)
        .metadata("v.i32", -2_000_000_000i32)
        .metadata("v.f32", 1.5f32)
        .metadata("v.bool", true)
        .metadata("v.string", "")
        .metadata("v.u64", u64::MAX)
        .metadata("v.i64", i64::MIN)
        .metadata("v.f64", -2.25f64)
        .metadata("llama.block_count", 2u32)
        .metadata("tokenizer.ggml.tokens", Array::from(vec!["<s>", "</s>", "hello", ""]))
        .metadata("tokenizer.ggml.scores", Array::from(vec![0.0f32, -1.0, -2.5, 3.0]))
        .metadata("v.bools", Array::from(vec![true, false]))
        .metadata("v.empty", Array::U32(vec![]))
        .metadata(
            "v.nested",
            Array::Array(vec![
                Array::from(vec![1i64, -2]),
                Array::Array(vec![Array::from(vec!["deep"])]),
                Array::F64(vec![]),
            ]),
        );
    w.tensor("token_embd.weight", GgmlType::F32, vec![2, 3], pattern(24, 1))
        .unwrap()
        .tensor("blk.0.attn_q.weight", GgmlType::Q8_0, vec![2, 32], pattern(68, 2))
        .unwrap()
        .tensor("output.weight", GgmlType::Q4_K, vec![1, 256], pattern(144, 3))
        .unwrap();
    w
}

pub fn shared(bytes: &[u8]) -> SharedBytes {
    SharedBytes::new(bytes.to_vec())
}

pub fn parse(bytes: &[u8]) -> Result<GgufFile, FormatError> {
    GgufFile::from_bytes("test.gguf", shared(bytes))
}

/// Parses and expects an error whose message contains every one of `parts`.
#[track_caller]
pub fn parse_err(bytes: &[u8], parts: &[&str]) -> FormatError {
    let e = match parse(bytes) {
        Ok(f) => panic!("expected an error containing {parts:?}, parsed {f:?}"),
        Err(e) => e,
    };
    assert_msg(&e, parts);
    e
}

#[track_caller]
pub fn assert_msg(e: &FormatError, parts: &[&str]) {
    let msg = e.to_string();
    for p in parts {
        assert!(msg.contains(p), "error {msg:?} does not contain {p:?}");
    }
}

/// Position of the first occurrence of `needle`.
#[track_caller]
pub fn find(hay: &[u8], needle: &[u8]) -> usize {
    hay.windows(needle.len()).position(|w| w == needle).expect("needle not found")
}

pub fn put_u32(buf: &mut [u8], at: usize, v: u32) {
    buf[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

pub fn put_u64(buf: &mut [u8], at: usize, v: u64) {
    buf[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

/// Position just after the name of tensor info `name` (its `n_dims` field).
#[track_caller]
pub fn tensor_info_fields(bytes: &[u8], name: &str) -> usize {
    // The name is preceded by its u64 length; a key with the same text would be found first,
    // so tensor names used here must not also be metadata keys.
    let mut needle = (name.len() as u64).to_le_bytes().to_vec();
    needle.extend_from_slice(name.as_bytes());
    find(bytes, &needle) + needle.len()
}

/// Position of the value type tag of metadata `key`.
#[track_caller]
pub fn kv_type_pos(bytes: &[u8], key: &str) -> usize {
    let mut needle = (key.len() as u64).to_le_bytes().to_vec();
    needle.extend_from_slice(key.as_bytes());
    find(bytes, &needle) + needle.len()
}

/// Reads every tensor and every metadata value; must never panic, whatever the file.
pub fn touch_everything(src: &dyn TensorSource) -> usize {
    let mut n = 0;
    for name in src.tensor_names() {
        if let Ok(t) = src.tensor(&name) {
            n += t.data.iter().map(|&b| b as usize).sum::<usize>() % 7;
        }
    }
    n
}

pub fn touch_metadata(f: &GgufFile) -> usize {
    fn walk(v: &Value) -> usize {
        let _ = (v.as_u64(), v.as_i64(), v.as_f64(), v.as_f32(), v.as_bool(), v.as_str());
        match v.as_array() {
            Some(a) => a.iter().map(|x| walk(&x)).sum::<usize>() + 1,
            None => 1,
        }
    }
    f.metadata().iter().map(|(_, v)| walk(v)).sum()
}

/// A safetensors file; `entries` are (name, dtype, shape, data), laid out in order.
pub fn safetensors(entries: &[(&str, &str, &[usize], Vec<u8>)]) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), serde_json::json!({"format": "pt"}));
    let mut data = Vec::new();
    for (name, dtype, shape, bytes) in entries {
        let begin = data.len();
        data.extend_from_slice(bytes);
        header.insert(
            (*name).into(),
            serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [begin, data.len()]}),
        );
    }
    safetensors_raw(&serde_json::Value::Object(header).to_string(), &data)
}

/// A safetensors file with a given header text (padded with spaces to 8 bytes).
pub fn safetensors_raw(header: &str, data: &[u8]) -> Vec<u8> {
    let mut h = header.as_bytes().to_vec();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&h);
    out.extend_from_slice(data);
    out
}
