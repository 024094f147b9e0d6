//! GGUF, llama.cpp's single-file model format (versions 2 and 3).
//!
//! Layout, all little-endian:
//!
//! ```text
//! magic "GGUF" | version u32 | tensor_count u64 | kv_count u64
//! kv_count × { key: string, value_type: u32, value }
//! tensor_count × { name: string, n_dims: u32, ne: n_dims × u64, ggml_type: u32, offset: u64 }
//! padding to `general.alignment` (default 32)
//! data section: each tensor at `offset` from its start, `offset` a multiple of the alignment
//! ```
//!
//! A string is a u64 byte length and that many UTF-8 bytes; an array is an element type u32,
//! a u64 count and the elements (arrays may nest). `ne` lists dimensions innermost first, so a
//! `[rows, cols]` matrix is stored as `ne = [cols, rows]`; [`TensorInfo::shape`] is row-major.
//! Version 1 used u32 counts and lengths and is rejected.
//!
//! The file is memory-mapped and parsed eagerly but without copying tensor data: every count
//! and length is checked against the remaining bytes before anything is allocated, and every
//! tensor's byte range is checked against the file at open time, so a [`GgufFile`] that opened
//! hands out tensors that are guaranteed to be in bounds.

mod model;
mod reader;
mod value;
pub mod writer;

use std::collections::HashMap;
use std::path::Path;

use kt_core::{GgmlType, SharedBytes, WeightTensor};

pub use model::{GgufModel, SplitName};
use reader::Reader;
pub use value::{Array, Metadata, StringArray, Value, ValueType};

use crate::FormatError;

/// The 4 bytes every GGUF file starts with.
pub const GGUF_MAGIC: [u8; 4] = *b"GGUF";
/// Data alignment when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// The most dimensions a GGML tensor has.
pub const MAX_DIMS: usize = 4;
/// Arrays of arrays may nest this deep (real files use 1, rarely 2).
pub const MAX_ARRAY_NESTING: usize = 8;

/// Smallest possible metadata pair: empty key (8) + type (4) + a one-byte value.
const MIN_KV_BYTES: usize = 8 + 4 + 1;
/// Smallest possible tensor info: empty name (8) + n_dims (4) + type (4) + offset (8).
const MIN_TENSOR_INFO_BYTES: usize = 8 + 4 + 4 + 8;

/// Where one tensor's data lies and how to read it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    pub ty: GgmlType,
    /// Row-major, outermost dimension first (the reverse of GGML's `ne`).
    pub shape: Vec<usize>,
    /// Offset of the data from the start of the data section, as stored in the file.
    pub offset: u64,
    /// Size of the data in bytes.
    pub n_bytes: usize,
}

impl TensorInfo {
    /// Dimensions in GGML order, innermost first.
    pub fn ne(&self) -> Vec<usize> {
        self.shape.iter().rev().copied().collect()
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// One parsed GGUF file. The tensors it hands out borrow its memory map.
pub struct GgufFile {
    /// 2 or 3.
    pub version: u32,
    /// Alignment of the data section and of every tensor in it.
    pub alignment: u64,
    name: String,
    bytes: SharedBytes,
    metadata: Metadata,
    tensors: Vec<TensorInfo>,
    index: HashMap<String, usize>,
    data_start: usize,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("name", &self.name)
            .field("version", &self.version)
            .field("alignment", &self.alignment)
            .field("metadata", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .field("bytes", &self.bytes.len())
            .finish()
    }
}

impl GgufFile {
    /// Memory-maps and parses `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, FormatError> {
        let path = path.as_ref();
        let bytes = crate::mmap::map_file(path)?;
        Self::from_bytes(path.display().to_string(), bytes)
    }

    /// Parses a GGUF image already in memory; `name` is used in error messages.
    pub fn from_bytes(name: impl Into<String>, bytes: SharedBytes) -> Result<Self, FormatError> {
        let name = name.into();
        let parsed = parse(&name, &bytes)?;
        Ok(Self {
            version: parsed.version,
            alignment: parsed.alignment,
            metadata: parsed.metadata,
            index: parsed.index,
            tensors: parsed.tensors,
            data_start: parsed.data_start,
            name,
            bytes,
        })
    }

    /// The name used in error messages (the path, for opened files).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The whole file.
    pub fn bytes(&self) -> &SharedBytes {
        &self.bytes
    }

    /// Offset of the data section from the start of the file.
    pub fn data_start(&self) -> usize {
        self.data_start
    }

    pub fn metadata(&self) -> &Metadata {
        &self.metadata
    }

    /// `general.architecture`.
    pub fn arch(&self) -> Option<&str> {
        self.metadata.arch()
    }

    /// Tensor descriptions in file order.
    pub fn tensor_infos(&self) -> &[TensorInfo] {
        &self.tensors
    }

    pub fn tensor_info(&self, name: &str) -> Option<&TensorInfo> {
        self.index.get(name).and_then(|&i| self.tensors.get(i))
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// Tensor names in file order.
    pub fn tensor_names(&self) -> Vec<String> {
        self.tensors.iter().map(|t| t.name.clone()).collect()
    }

    /// The tensor `name`, its data a zero-copy slice of the file.
    pub fn tensor(&self, name: &str) -> Result<WeightTensor, FormatError> {
        let info = self.tensor_info(name).ok_or_else(|| FormatError::TensorNotFound {
            source_name: self.name.clone(),
            name: name.to_owned(),
        })?;
        self.load(info)
    }

    fn load(&self, info: &TensorInfo) -> Result<WeightTensor, FormatError> {
        let bad = |reason: String| FormatError::bad_tensor(&self.name, &info.name, reason);
        // Both checked at open; checked again so that no path can panic.
        let start = usize::try_from(info.offset)
            .ok()
            .and_then(|o| o.checked_add(self.data_start))
            .ok_or_else(|| bad(format!("data offset {} is out of range", info.offset)))?;
        let end = start
            .checked_add(info.n_bytes)
            .ok_or_else(|| bad(format!("data offset {} is out of range", info.offset)))?;
        let data = self.bytes.slice(start..end).ok_or_else(|| {
            bad(format!(
                "data [{start}..{end}) ends past the end of the file ({} bytes)",
                self.bytes.len()
            ))
        })?;
        WeightTensor::new(info.name.clone(), info.ty, info.shape.clone(), data)
            .map_err(|e| bad(e.to_string()))
    }
}

struct Parsed {
    version: u32,
    alignment: u64,
    metadata: Metadata,
    tensors: Vec<TensorInfo>,
    index: HashMap<String, usize>,
    data_start: usize,
}

fn parse(file: &str, buf: &[u8]) -> Result<Parsed, FormatError> {
    let mut r = Reader::new(file, buf);

    if buf.len() < GGUF_MAGIC.len() {
        if !GGUF_MAGIC.starts_with(buf) {
            return Err(FormatError::NotGguf { file: file.to_owned(), found: buf.to_vec() });
        }
        return Err(r.truncated("magic", GGUF_MAGIC.len() as u128));
    }
    let magic = r.take(4, "magic")?;
    if magic != GGUF_MAGIC {
        return Err(FormatError::NotGguf { file: file.to_owned(), found: magic.to_vec() });
    }

    let version = r.u32("version")?;
    match version {
        2 | 3 => {}
        1 => {
            return Err(FormatError::UnsupportedVersion {
                file: file.to_owned(),
                version,
                reason: "version 1 (32-bit counts, 2023) is obsolete; \
                         convert the model again with a current llama.cpp",
            })
        }
        v if matches!(v.swap_bytes(), 2 | 3) => {
            return Err(FormatError::UnsupportedVersion {
                file: file.to_owned(),
                version: v.swap_bytes(),
                reason: "this is a big-endian GGUF file; kt reads little-endian files only",
            })
        }
        _ => {
            return Err(FormatError::UnsupportedVersion {
                file: file.to_owned(),
                version,
                reason: "kt reads versions 2 and 3",
            })
        }
    }

    let tensor_count = r.u64("tensor count")?;
    let kv_count = r.u64("metadata count")?;
    // Both tables must fit in the file before anything is allocated for them.
    let need = u128::from(kv_count) * MIN_KV_BYTES as u128
        + u128::from(tensor_count) * MIN_TENSOR_INFO_BYTES as u128;
    if need > r.remaining() as u128 {
        return Err(r.truncated(
            format!("{kv_count} metadata pairs and {tensor_count} tensor descriptions"),
            need,
        ));
    }

    let mut metadata = Metadata::new();
    let mut alignment_at = 0;
    for _ in 0..kv_count {
        let at = r.pos();
        let key = r.string_bytes("metadata key")?;
        let key = std::str::from_utf8(key)
            .map_err(|_| r.malformed(at, format!("metadata key {} is not UTF-8", preview(key))))?
            .to_owned();
        let value = read_kv_value(&mut r, &key)?;
        if key == "general.alignment" {
            alignment_at = at;
        }
        metadata
            .insert(key, value)
            .map_err(|(key, _)| r.malformed(at, format!("metadata key `{key}` appears twice")))?;
    }

    let alignment = match metadata.get("general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some(v) => match v.as_u64() {
            Some(a) if a.is_power_of_two() => a,
            _ => {
                return Err(r.malformed(
                    alignment_at,
                    format!(
                        "general.alignment is {v} ({}); it must be a nonzero power of two",
                        v.value_type()
                    ),
                ))
            }
        },
    };

    let n_tensors = r.check_count(tensor_count, MIN_TENSOR_INFO_BYTES, || {
        format!("{tensor_count} tensor descriptions")
    })?;
    let mut raw = Vec::with_capacity(n_tensors);
    for _ in 0..n_tensors {
        raw.push(read_tensor_info(&mut r)?);
    }

    let data_start = align_up(r.pos() as u64, alignment)
        .and_then(|s| usize::try_from(s).ok())
        .ok_or_else(|| r.malformed(r.pos(), "data section start overflows"))?;

    let mut tensors = Vec::with_capacity(raw.len());
    let mut index = HashMap::with_capacity(raw.len());
    for t in raw {
        let info = check_tensor(file, t, alignment, data_start, buf.len())?;
        if index.insert(info.name.clone(), tensors.len()).is_some() {
            return Err(FormatError::bad_tensor(file, &info.name, "is described twice"));
        }
        tensors.push(info);
    }

    Ok(Parsed { version, alignment, metadata, tensors, index, data_start })
}

/// A short printable rendering of bytes that failed to decode.
fn preview(bytes: &[u8]) -> String {
    const MAX: usize = 40;
    let shown = String::from_utf8_lossy(&bytes[..bytes.len().min(MAX)]).into_owned();
    if bytes.len() > MAX {
        format!("{shown:?}... ({} bytes)", bytes.len())
    } else {
        format!("{shown:?}")
    }
}

/// Rounds `x` up to a multiple of `alignment`, a nonzero power of two.
fn align_up(x: u64, alignment: u64) -> Option<u64> {
    Some(x.checked_add(alignment - 1)? & !(alignment - 1))
}

/// Reads the type tag and value of the metadata pair `key`.
fn read_kv_value(r: &mut Reader<'_>, key: &str) -> Result<Value, FormatError> {
    let at = r.pos();
    let id = r.u32("metadata value type")?;
    let ty = ValueType::from_id(id)
        .ok_or_else(|| r.malformed(at, format!("metadata `{key}` has unknown value type {id}")))?;
    read_value(r, ty, 0).map_err(|e| in_key(e, key))
}

/// Adds the metadata key to a parse error's description.
fn in_key(e: FormatError, key: &str) -> FormatError {
    match e {
        FormatError::Truncated { file, offset, what, need, have } => FormatError::Truncated {
            file,
            offset,
            what: format!("metadata `{key}`: {what}"),
            need,
            have,
        },
        FormatError::Malformed { file, offset, reason } => {
            FormatError::Malformed { file, offset, reason: format!("metadata `{key}`: {reason}") }
        }
        e => e,
    }
}

fn read_string(r: &mut Reader<'_>, what: &str) -> Result<String, FormatError> {
    let bytes = r.string_bytes(what)?;
    // Strings are UTF-8 by the spec; a stray invalid byte in, say, one token of a 150k-token
    // vocabulary is replaced rather than failing the whole model.
    Ok(String::from_utf8_lossy(bytes).into_owned())
}

fn read_value(r: &mut Reader<'_>, ty: ValueType, depth: usize) -> Result<Value, FormatError> {
    Ok(match ty {
        ValueType::U8 => Value::U8(r.u8("u8 value")?),
        ValueType::I8 => Value::I8(r.u8("i8 value")? as i8),
        ValueType::U16 => Value::U16(r.u16("u16 value")?),
        ValueType::I16 => Value::I16(r.u16("i16 value")? as i16),
        ValueType::U32 => Value::U32(r.u32("u32 value")?),
        ValueType::I32 => Value::I32(r.u32("i32 value")? as i32),
        ValueType::F32 => Value::F32(f32::from_bits(r.u32("f32 value")?)),
        ValueType::U64 => Value::U64(r.u64("u64 value")?),
        ValueType::I64 => Value::I64(r.u64("i64 value")? as i64),
        ValueType::F64 => Value::F64(f64::from_bits(r.u64("f64 value")?)),
        ValueType::Bool => {
            let at = r.pos();
            let b = r.u8("bool value")?;
            Value::Bool(to_bool(r, at, b)?)
        }
        ValueType::String => Value::String(read_string(r, "string")?),
        ValueType::Array => Value::Array(read_array(r, depth + 1)?),
    })
}

fn to_bool(r: &Reader<'_>, at: usize, b: u8) -> Result<bool, FormatError> {
    match b {
        0 => Ok(false),
        1 => Ok(true),
        b => Err(r.malformed(at, format!("bool value {b} is neither 0 nor 1"))),
    }
}

/// Decodes `n` little-endian values of `N` bytes each (the caller checked they are there).
fn read_fixed<T, const N: usize>(
    r: &mut Reader<'_>,
    n: usize,
    what: &str,
    f: impl Fn([u8; N]) -> T,
) -> Result<Vec<T>, FormatError> {
    let bytes = r.take(n * N, what)?;
    Ok(bytes
        .chunks_exact(N)
        .map(|c| {
            let mut a = [0u8; N];
            a.copy_from_slice(c);
            f(a)
        })
        .collect())
}

fn read_array(r: &mut Reader<'_>, depth: usize) -> Result<Array, FormatError> {
    let at = r.pos();
    if depth > MAX_ARRAY_NESTING {
        return Err(r.malformed(at, format!("arrays nested more than {MAX_ARRAY_NESTING} deep")));
    }
    let id = r.u32("array element type")?;
    let elem = ValueType::from_id(id)
        .ok_or_else(|| r.malformed(at, format!("array has unknown element type {id}")))?;
    let count = r.u64("array length")?;
    let n = r.check_count(count, elem.min_encoded_size(), || {
        format!("array of {count} {elem} values")
    })?;
    let what = "array elements";
    Ok(match elem {
        ValueType::U8 => Array::U8(r.take(n, what)?.to_vec()),
        ValueType::I8 => Array::I8(r.take(n, what)?.iter().map(|&b| b as i8).collect()),
        ValueType::U16 => Array::U16(read_fixed(r, n, what, u16::from_le_bytes)?),
        ValueType::I16 => Array::I16(read_fixed(r, n, what, i16::from_le_bytes)?),
        ValueType::U32 => Array::U32(read_fixed(r, n, what, u32::from_le_bytes)?),
        ValueType::I32 => Array::I32(read_fixed(r, n, what, i32::from_le_bytes)?),
        ValueType::F32 => Array::F32(read_fixed(r, n, what, f32::from_le_bytes)?),
        ValueType::U64 => Array::U64(read_fixed(r, n, what, u64::from_le_bytes)?),
        ValueType::I64 => Array::I64(read_fixed(r, n, what, i64::from_le_bytes)?),
        ValueType::F64 => Array::F64(read_fixed(r, n, what, f64::from_le_bytes)?),
        ValueType::Bool => {
            let start = r.pos();
            let bytes = r.take(n, what)?;
            let mut out = Vec::with_capacity(n);
            for (i, &b) in bytes.iter().enumerate() {
                out.push(to_bool(r, start + i, b)?);
            }
            Array::Bool(out)
        }
        ValueType::String => {
            let mut text = Vec::new();
            let mut ends = Vec::with_capacity(n);
            for _ in 0..n {
                text.extend_from_slice(r.string_bytes("string in array")?);
                ends.push(text.len());
            }
            Array::String(StringArray::from_concatenated_lossy(text, ends))
        }
        ValueType::Array => {
            let mut out = Vec::with_capacity(n);
            for _ in 0..n {
                out.push(read_array(r, depth + 1)?);
            }
            Array::Array(out)
        }
    })
}

/// A tensor description as stored, before validation.
struct RawTensorInfo {
    name: String,
    ne: Vec<u64>,
    type_id: u32,
    offset: u64,
}

fn read_tensor_info(r: &mut Reader<'_>) -> Result<RawTensorInfo, FormatError> {
    let at = r.pos();
    let name = r.string_bytes("tensor name")?;
    let name = std::str::from_utf8(name)
        .map_err(|_| r.malformed(at, format!("tensor name {} is not UTF-8", preview(name))))?
        .to_owned();
    let n_dims = r.u32("tensor dimension count")?;
    if n_dims as usize > MAX_DIMS {
        return Err(FormatError::bad_tensor(
            r.file(),
            &name,
            format!("has {n_dims} dimensions; GGML tensors have at most {MAX_DIMS}"),
        ));
    }
    let mut ne = Vec::with_capacity(n_dims as usize);
    for _ in 0..n_dims {
        ne.push(r.u64("tensor dimension")?);
    }
    let type_id = r.u32("tensor type")?;
    let offset = r.u64("tensor data offset")?;
    Ok(RawTensorInfo { name, ne, type_id, offset })
}

fn check_tensor(
    file: &str,
    t: RawTensorInfo,
    alignment: u64,
    data_start: usize,
    file_len: usize,
) -> Result<TensorInfo, FormatError> {
    let bad = |reason: String| FormatError::bad_tensor(file, &t.name, reason);
    let ty = GgmlType::from_id(t.type_id)
        .ok_or_else(|| bad(format!("has unknown GGML type id {}", t.type_id)))?;
    // The product of the nonzero dimensions must fit: a zero dimension must not hide huge ones
    // from later size arithmetic.
    let fits = t.ne.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d.max(1)));
    let shape: Option<Vec<usize>> =
        fits.and_then(|_| t.ne.iter().rev().map(|&d| usize::try_from(d).ok()).collect());
    let Some(shape) = shape else {
        return Err(bad(format!(
            "dimensions {:?} are too large: their product overflows 64 bits",
            t.ne
        )));
    };
    let ne0 = t.ne.first().copied().unwrap_or(1);
    if ne0 % ty.block_size() as u64 != 0 {
        return Err(bad(format!(
            "has rows of {ne0} elements, not a whole number of {ty} blocks of {}",
            ty.block_size()
        )));
    }
    // The bytes the tensor would take with every zero dimension counted as 1 must fit too, so
    // that per-row arithmetic (`WeightTensor::row_bytes`, ...) on an empty tensor cannot
    // overflow either.
    let outer: u64 = t.ne.iter().skip(1).map(|&d| d.max(1)).product();
    let nonzero_bytes = shape
        .last()
        .map_or(Some(ty.type_size()), |&ne0| ty.row_bytes(ne0))
        .zip(usize::try_from(outer).ok())
        .and_then(|(row, outer)| row.checked_mul(outer));
    let n_bytes = WeightTensor::byte_len(ty, &shape).and_then(|n| usize::try_from(n).ok());
    let (Some(_), Some(n_bytes)) = (nonzero_bytes, n_bytes) else {
        return Err(bad(format!("dimensions {:?} of type {ty} take too many bytes", t.ne)));
    };
    // `alignment` is a nonzero power of two (checked when it was read).
    if t.offset & (alignment - 1) != 0 {
        return Err(bad(format!(
            "data offset {} is not a multiple of the alignment {alignment}",
            t.offset
        )));
    }
    let start = u128::from(t.offset) + data_start as u128;
    let end = start + n_bytes as u128;
    if end > file_len as u128 {
        return Err(bad(format!(
            "data [{start}..{end}) ends past the end of the file ({file_len} bytes)"
        )));
    }
    Ok(TensorInfo { name: t.name, ty, shape, offset: t.offset, n_bytes })
}
