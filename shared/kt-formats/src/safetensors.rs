//! safetensors, Hugging Face's weight format.
//!
//! ```text
//! header_len: u64 little-endian | header: header_len bytes of UTF-8 JSON | data
//! ```
//!
//! The header is a JSON object mapping each tensor name to
//! `{"dtype": "BF16", "shape": [rows, cols], "data_offsets": [begin, end]}`, offsets relative
//! to the start of the data; an optional `"__metadata__"` entry (string → string) is ignored.
//! Shapes are row-major. Every tensor is checked at open: offsets inside the data, byte length
//! equal to shape × dtype size, no two tensors overlapping.
//!
//! Only the byte buffer after the 8-byte length is aligned to nothing in particular: tensor
//! data is at whatever offset the header length leaves it (writers pad the header to 8 bytes).

use std::collections::HashMap;
use std::path::Path;

use kt_core::{GgmlType, SharedBytes, WeightTensor};
use serde::Deserialize;

use crate::FormatError;

/// Headers larger than this are refused (the reference implementation's limit).
pub const MAX_HEADER_BYTES: u64 = 100_000_000;

/// Element types safetensors files declare.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Dtype {
    Bool,
    U8,
    I8,
    F8E5M2,
    F8E4M3,
    F8E8M0,
    I16,
    U16,
    F16,
    BF16,
    I32,
    U32,
    F32,
    F64,
    I64,
    U64,
    C64,
    F4,
    F6E2M3,
    F6E3M2,
    /// A dtype this crate does not know; its tensors are described but cannot be loaded, and
    /// their byte length cannot be checked.
    Other(String),
}

impl Dtype {
    pub fn parse(s: &str) -> Self {
        use Dtype::*;
        match s {
            "BOOL" => Bool,
            "U8" => U8,
            "I8" => I8,
            "F8_E5M2" => F8E5M2,
            "F8_E4M3" => F8E4M3,
            "F8_E8M0" => F8E8M0,
            "I16" => I16,
            "U16" => U16,
            "F16" => F16,
            "BF16" => BF16,
            "I32" => I32,
            "U32" => U32,
            "F32" => F32,
            "F64" => F64,
            "I64" => I64,
            "U64" => U64,
            "C64" => C64,
            "F4" => F4,
            "F6_E2M3" => F6E2M3,
            "F6_E3M2" => F6E3M2,
            other => Other(other.to_owned()),
        }
    }

    /// The name as written in headers.
    pub fn name(&self) -> &str {
        use Dtype::*;
        match self {
            Bool => "BOOL",
            U8 => "U8",
            I8 => "I8",
            F8E5M2 => "F8_E5M2",
            F8E4M3 => "F8_E4M3",
            F8E8M0 => "F8_E8M0",
            I16 => "I16",
            U16 => "U16",
            F16 => "F16",
            BF16 => "BF16",
            I32 => "I32",
            U32 => "U32",
            F32 => "F32",
            F64 => "F64",
            I64 => "I64",
            U64 => "U64",
            C64 => "C64",
            F4 => "F4",
            F6E2M3 => "F6_E2M3",
            F6E3M2 => "F6_E3M2",
            Other(s) => s,
        }
    }

    /// Bits per element, `None` for unknown dtypes.
    pub fn bits(&self) -> Option<u32> {
        use Dtype::*;
        Some(match self {
            F4 => 4,
            F6E2M3 | F6E3M2 => 6,
            Bool | U8 | I8 | F8E5M2 | F8E4M3 | F8E8M0 => 8,
            I16 | U16 | F16 | BF16 => 16,
            I32 | U32 | F32 => 32,
            F64 | I64 | U64 | C64 => 64,
            Other(_) => return None,
        })
    }

    /// The GGML type kt loads this dtype as, if it loads it at all.
    pub fn ggml_type(&self) -> Option<GgmlType> {
        match self {
            Dtype::F32 => Some(GgmlType::F32),
            Dtype::F16 => Some(GgmlType::F16),
            Dtype::BF16 => Some(GgmlType::BF16),
            _ => None,
        }
    }
}

impl std::fmt::Display for Dtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One tensor's description from a safetensors header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SafetensorsInfo {
    pub name: String,
    pub dtype: Dtype,
    /// Row-major.
    pub shape: Vec<usize>,
    /// `[begin, end)` relative to the start of the data (after the header).
    pub data_offsets: (usize, usize),
}

/// The header entry as written.
#[derive(Deserialize)]
struct RawInfo {
    dtype: String,
    shape: Vec<u64>,
    data_offsets: [u64; 2],
}

/// One parsed safetensors file; its tensors borrow its memory map.
pub struct SafetensorsFile {
    name: String,
    bytes: SharedBytes,
    data_start: usize,
    tensors: Vec<SafetensorsInfo>,
    index: HashMap<String, usize>,
}

impl std::fmt::Debug for SafetensorsFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SafetensorsFile")
            .field("name", &self.name)
            .field("tensors", &self.tensors.len())
            .field("bytes", &self.bytes.len())
            .finish()
    }
}

impl SafetensorsFile {
    /// Memory-maps and parses `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, FormatError> {
        let path = path.as_ref();
        let bytes = crate::mmap::map_file(path)?;
        Self::from_bytes(path.display().to_string(), bytes)
    }

    /// Parses a safetensors image already in memory; `name` is used in error messages.
    pub fn from_bytes(name: impl Into<String>, bytes: SharedBytes) -> Result<Self, FormatError> {
        let name = name.into();
        let file = name.as_str();
        let truncated = |what: String, offset: u64, need: u128, have: usize| {
            FormatError::Truncated { file: file.to_owned(), offset, what, need, have: have as u64 }
        };
        let Some(len_bytes) = bytes.get(..8) else {
            return Err(truncated("header length".to_owned(), 0, 8, bytes.len()));
        };
        let mut len = [0u8; 8];
        len.copy_from_slice(len_bytes);
        let header_len = u64::from_le_bytes(len);
        let rest = bytes.len() - 8;
        if header_len > MAX_HEADER_BYTES {
            return Err(FormatError::Malformed {
                file: file.to_owned(),
                offset: 0,
                reason: format!(
                    "header length {header_len} is over the {MAX_HEADER_BYTES}-byte limit"
                ),
            });
        }
        if header_len > rest as u64 {
            return Err(truncated(
                format!("JSON header of {header_len} bytes"),
                8,
                header_len.into(),
                rest,
            ));
        }
        // In range: header_len <= rest.
        let data_start = 8 + header_len as usize;
        let data_len = bytes.len() - data_start;
        let header = bytes.get(8..data_start).unwrap_or_default();
        let entries: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(header)
            .map_err(|source| FormatError::Json { file: file.to_owned(), source })?;

        let mut tensors = Vec::with_capacity(entries.len());
        for (tname, value) in entries {
            if tname == "__metadata__" {
                continue;
            }
            let bad = |reason: String| FormatError::bad_tensor(file, &tname, reason);
            let raw: RawInfo = serde_json::from_value(value)
                .map_err(|e| bad(format!("has an invalid header entry: {e}")))?;
            let dtype = Dtype::parse(&raw.dtype);
            let shape: Option<Vec<usize>> =
                raw.shape.iter().map(|&d| usize::try_from(d).ok()).collect();
            // Zero dimensions count as 1, so that no per-row arithmetic on an empty tensor can
            // overflow; the bytes this takes must fit in memory.
            let nonzero = raw.shape.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d.max(1)));
            let fits = nonzero.is_some_and(|n| {
                u128::from(n) * u128::from(dtype.bits().unwrap_or(8)) <= usize::MAX as u128 * 8
            });
            let (true, Some(shape)) = (fits, shape) else {
                return Err(bad(format!("shape {:?} has too many elements", raw.shape)));
            };
            let [begin, end] = raw.data_offsets;
            if begin > end || end > data_len as u64 {
                return Err(bad(format!(
                    "data_offsets [{begin}, {end}) do not lie within the {data_len} data bytes"
                )));
            }
            let (begin, end) = (begin as usize, end as usize);
            if let Some(bits) = dtype.bits() {
                let numel: u128 = shape.iter().map(|&d| d as u128).product();
                let need_bits = numel * u128::from(bits);
                let have = (end - begin) as u128;
                if need_bits != have * 8 {
                    return Err(bad(format!(
                        "of dtype {dtype} and shape {shape:?} takes {} bytes, \
                         but data_offsets [{begin}, {end}) hold {have}",
                        need_bits.div_ceil(8)
                    )));
                }
            }
            tensors.push(SafetensorsInfo { name: tname, dtype, shape, data_offsets: (begin, end) });
        }

        // File order; then no two non-empty tensors may share bytes.
        tensors.sort_by(|a, b| (a.data_offsets, &a.name).cmp(&(b.data_offsets, &b.name)));
        let mut prev: Option<&SafetensorsInfo> = None;
        for t in tensors.iter().filter(|t| t.data_offsets.0 < t.data_offsets.1) {
            if let Some(p) = prev {
                if t.data_offsets.0 < p.data_offsets.1 {
                    return Err(FormatError::bad_tensor(
                        file,
                        &t.name,
                        format!(
                            "data [{}, {}) overlaps tensor `{}` at [{}, {})",
                            t.data_offsets.0,
                            t.data_offsets.1,
                            p.name,
                            p.data_offsets.0,
                            p.data_offsets.1
                        ),
                    ));
                }
            }
            prev = Some(t);
        }

        let index = tensors.iter().enumerate().map(|(i, t)| (t.name.clone(), i)).collect();
        Ok(Self { name, bytes, data_start, tensors, index })
    }

    /// The name used in error messages (the path, for opened files).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Offset of the data buffer from the start of the file.
    pub fn data_start(&self) -> usize {
        self.data_start
    }

    /// Tensor descriptions in data order.
    pub fn tensor_infos(&self) -> &[SafetensorsInfo] {
        &self.tensors
    }

    pub fn tensor_info(&self, name: &str) -> Option<&SafetensorsInfo> {
        self.index.get(name).and_then(|&i| self.tensors.get(i))
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// Tensor names in data order.
    pub fn tensor_names(&self) -> Vec<String> {
        self.tensors.iter().map(|t| t.name.clone()).collect()
    }

    /// The raw bytes of a tensor of any dtype.
    pub fn tensor_bytes(&self, name: &str) -> Result<SharedBytes, FormatError> {
        let info = self.tensor_info(name).ok_or_else(|| self.not_found(name))?;
        self.data(info)
    }

    /// The tensor `name` (F32, F16 or BF16), its data a zero-copy slice of the file.
    pub fn tensor(&self, name: &str) -> Result<WeightTensor, FormatError> {
        let info = self.tensor_info(name).ok_or_else(|| self.not_found(name))?;
        let ty = info.dtype.ggml_type().ok_or_else(|| FormatError::UnsupportedDtype {
            file: self.name.clone(),
            name: name.to_owned(),
            dtype: info.dtype.name().to_owned(),
        })?;
        let data = self.data(info)?;
        WeightTensor::new(name, ty, info.shape.clone(), data)
            .map_err(|e| FormatError::bad_tensor(&self.name, name, e.to_string()))
    }

    fn not_found(&self, name: &str) -> FormatError {
        FormatError::TensorNotFound { source_name: self.name.clone(), name: name.to_owned() }
    }

    fn data(&self, info: &SafetensorsInfo) -> Result<SharedBytes, FormatError> {
        let (b, e) = info.data_offsets;
        let range = self.data_start.checked_add(b).zip(self.data_start.checked_add(e));
        range.and_then(|(s, e)| self.bytes.slice(s..e)).ok_or_else(|| {
            FormatError::bad_tensor(
                &self.name,
                &info.name,
                format!("data_offsets [{b}, {e}) lie past the end of the file"),
            )
        })
    }
}
