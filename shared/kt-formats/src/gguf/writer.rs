//! A small GGUF writer for tests, fixtures and tools (such as the synthetic file of the open
//! benchmark). It writes what it is told, duplicates included, so that tests can build files
//! the reader must reject.

use std::fs::File;
use std::io::{self, Seek, SeekFrom, Write};
use std::path::Path;

use kt_core::GgmlType;

use super::{Array, Value, DEFAULT_ALIGNMENT, GGUF_MAGIC};
use crate::FormatError;

struct PendingTensor {
    name: String,
    ty: GgmlType,
    shape: Vec<usize>,
    n_bytes: usize,
    /// `None`: all zeros, left as a hole by [`GgufWriter::write`].
    data: Option<Vec<u8>>,
}

/// Builds a GGUF file in memory or on disk.
pub struct GgufWriter {
    version: u32,
    alignment: u64,
    metadata: Vec<(String, Value)>,
    tensors: Vec<PendingTensor>,
}

impl Default for GgufWriter {
    fn default() -> Self {
        Self::new()
    }
}

impl GgufWriter {
    /// A version 3 file with the default alignment (32).
    pub fn new() -> Self {
        Self { version: 3, alignment: DEFAULT_ALIGNMENT, metadata: Vec::new(), tensors: Vec::new() }
    }

    /// The version number written in the header (the layout is that of versions 2 and 3).
    pub fn version(&mut self, version: u32) -> &mut Self {
        self.version = version;
        self
    }

    /// Aligns the data section and tensors to `alignment` and records it as
    /// `general.alignment` (replacing an earlier value).
    pub fn alignment(&mut self, alignment: u32) -> &mut Self {
        self.alignment = u64::from(alignment.max(1));
        self.metadata.retain(|(k, _)| k != "general.alignment");
        self.metadata.push(("general.alignment".to_owned(), Value::U32(alignment)));
        self
    }

    /// Appends a metadata pair (a repeated key is written twice).
    pub fn metadata(&mut self, key: impl Into<String>, value: impl Into<Value>) -> &mut Self {
        self.metadata.push((key.into(), value.into()));
        self
    }

    /// Appends a tensor; `shape` is row-major and `data` must have exactly its size.
    pub fn tensor(
        &mut self,
        name: impl Into<String>,
        ty: GgmlType,
        shape: Vec<usize>,
        data: Vec<u8>,
    ) -> Result<&mut Self, FormatError> {
        let name = name.into();
        let n_bytes = tensor_bytes(&name, ty, &shape)?;
        if data.len() != n_bytes {
            return Err(writer_error(
                &name,
                format!(
                    "of shape {shape:?} and type {ty} takes {n_bytes} bytes, got {}",
                    data.len()
                ),
            ));
        }
        self.tensors.push(PendingTensor { name, ty, shape, n_bytes, data: Some(data) });
        Ok(self)
    }

    /// Appends an all-zero tensor whose bytes [`GgufWriter::write`] leaves as a hole in a
    /// sparse file (so a 10 GB test file takes no disk space).
    pub fn zero_tensor(
        &mut self,
        name: impl Into<String>,
        ty: GgmlType,
        shape: Vec<usize>,
    ) -> Result<&mut Self, FormatError> {
        let name = name.into();
        let n_bytes = tensor_bytes(&name, ty, &shape)?;
        self.tensors.push(PendingTensor { name, ty, shape, n_bytes, data: None });
        Ok(self)
    }

    /// Data offsets of the tensors, relative to the data section.
    fn offsets(&self) -> Vec<u64> {
        let mut off = 0u64;
        self.tensors
            .iter()
            .map(|t| {
                let o = round_up(off, self.alignment);
                off = o + t.n_bytes as u64;
                o
            })
            .collect()
    }

    /// Everything before the data section, padding included.
    pub fn header(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&GGUF_MAGIC);
        out.extend_from_slice(&self.version.to_le_bytes());
        out.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&(self.metadata.len() as u64).to_le_bytes());
        for (key, value) in &self.metadata {
            put_str(&mut out, key);
            out.extend_from_slice(&value.value_type().id().to_le_bytes());
            put_value(&mut out, value);
        }
        for (t, offset) in self.tensors.iter().zip(self.offsets()) {
            put_str(&mut out, &t.name);
            out.extend_from_slice(&(t.shape.len() as u32).to_le_bytes());
            for &d in t.shape.iter().rev() {
                out.extend_from_slice(&(d as u64).to_le_bytes());
            }
            out.extend_from_slice(&t.ty.id().to_le_bytes());
            out.extend_from_slice(&offset.to_le_bytes());
        }
        out.resize(round_up(out.len() as u64, self.alignment) as usize, 0);
        out
    }

    /// The length of the whole file: the header, then the data section up to the end of the
    /// last tensor (no padding after it).
    pub fn file_len(&self) -> u64 {
        let data = match (self.tensors.last(), self.offsets().last()) {
            (Some(t), Some(&o)) => o + t.n_bytes as u64,
            _ => 0,
        };
        self.header().len() as u64 + data
    }

    /// The whole file in memory.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = self.header();
        let data_start = out.len();
        for (t, offset) in self.tensors.iter().zip(self.offsets()) {
            let start = data_start + offset as usize;
            out.resize(start, 0);
            match &t.data {
                Some(d) => out.extend_from_slice(d),
                None => out.resize(start + t.n_bytes, 0),
            }
        }
        out
    }

    /// Writes the file to `path`; zero tensors become holes of a sparse file.
    pub fn write(&self, path: impl AsRef<Path>) -> io::Result<()> {
        let mut f = File::create(path)?;
        let header = self.header();
        f.write_all(&header)?;
        for (t, offset) in self.tensors.iter().zip(self.offsets()) {
            if let Some(d) = &t.data {
                f.seek(SeekFrom::Start(header.len() as u64 + offset))?;
                f.write_all(d)?;
            }
        }
        f.set_len(self.file_len())?;
        f.sync_all()
    }

    /// Writes the file to `path` in one sequential pass, asking `fill(index, out)` for the bytes
    /// of every tensor declared without data ([`GgufWriter::zero_tensor`]), in the order the
    /// tensors were added; `index` counts all tensors. `fill` must write exactly the tensor's
    /// size. Tensors given with data are written as they are. Nothing but the header is held
    /// in memory, so files larger than memory can be streamed (the synthetic models of
    /// `kt synth`).
    pub fn write_with<F>(&self, path: impl AsRef<Path>, mut fill: F) -> io::Result<()>
    where
        F: FnMut(usize, &mut dyn Write) -> io::Result<()>,
    {
        let mut out = io::BufWriter::with_capacity(1 << 20, File::create(path)?);
        let header = self.header();
        out.write_all(&header)?;
        let mut pos = 0u64;
        for (i, (t, offset)) in self.tensors.iter().zip(self.offsets()).enumerate() {
            write_zeros(&mut out, offset - pos)?;
            match &t.data {
                Some(d) => out.write_all(d)?,
                None => {
                    let mut counted = Counted { inner: &mut out, n: 0 };
                    fill(i, &mut counted)?;
                    if counted.n != t.n_bytes as u64 {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            format!(
                                "tensor `{}` takes {} bytes, {} were written",
                                t.name, t.n_bytes, counted.n
                            ),
                        ));
                    }
                }
            }
            pos = offset + t.n_bytes as u64;
        }
        let f = out.into_inner().map_err(io::IntoInnerError::into_error)?;
        f.sync_all()
    }
}

/// Counts the bytes written through it.
struct Counted<'a, W: Write> {
    inner: &'a mut W,
    n: u64,
}

impl<W: Write> Write for Counted<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.n += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

fn write_zeros(out: &mut impl Write, mut n: u64) -> io::Result<()> {
    const ZEROS: [u8; 256] = [0; 256];
    while n > 0 {
        let k = n.min(ZEROS.len() as u64) as usize;
        out.write_all(&ZEROS[..k])?;
        n -= k as u64;
    }
    Ok(())
}

fn writer_error(name: &str, reason: String) -> FormatError {
    FormatError::bad_tensor("<gguf writer>", name, reason)
}

fn tensor_bytes(name: &str, ty: GgmlType, shape: &[usize]) -> Result<usize, FormatError> {
    let ne0 = shape.last().copied().unwrap_or(1);
    let rows = shape[..shape.len().saturating_sub(1)]
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d));
    rows.zip(ty.row_bytes(ne0)).and_then(|(rows, row)| rows.checked_mul(row)).ok_or_else(|| {
        writer_error(name, format!("shape {shape:?} of type {ty} has no valid size"))
    })
}

fn round_up(x: u64, alignment: u64) -> u64 {
    x.div_ceil(alignment) * alignment
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_value(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::U8(x) => out.push(*x),
        Value::I8(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::Bool(x) => out.push(u8::from(*x)),
        Value::String(s) => put_str(out, s),
        Value::Array(a) => put_array(out, a),
        Value::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
    }
}

fn put_array(out: &mut Vec<u8>, a: &Array) {
    out.extend_from_slice(&a.elem_type().id().to_le_bytes());
    out.extend_from_slice(&(a.len() as u64).to_le_bytes());
    match a {
        Array::String(v) => v.iter().for_each(|s| put_str(out, s)),
        Array::Array(v) => v.iter().for_each(|x| put_array(out, x)),
        other => other.iter().for_each(|x| put_value(out, &x)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_with_streams_the_same_bytes_as_to_bytes() {
        let a: Vec<u8> = (0..3 * 4).map(|i| i as u8).collect();
        let b: Vec<u8> = (0..34).map(|i| (i * 7) as u8).collect();
        let mut w = GgufWriter::new();
        w.metadata("general.architecture", "llama");
        w.tensor("a", GgmlType::F32, vec![3], a.clone()).unwrap();
        w.zero_tensor("b", GgmlType::Q8_0, vec![1, 32]).unwrap();
        w.zero_tensor("c", GgmlType::F32, vec![5]).unwrap();
        let expected = w.clone_with_data(&[(1, b.clone()), (2, vec![0; 20])]);
        let dir = std::env::temp_dir().join(format!("kt-writer-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("stream.gguf");
        w.write_with(&path, |i, out| match i {
            1 => out.write_all(&b),
            2 => out.write_all(&[0; 20]),
            _ => unreachable!("tensor {i} has data"),
        })
        .unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), expected.to_bytes());
        // A fill of the wrong size is an error.
        let err = w.write_with(&path, |_, out| out.write_all(&[1, 2, 3])).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    impl GgufWriter {
        fn clone_with_data(&self, data: &[(usize, Vec<u8>)]) -> GgufWriter {
            let mut w = GgufWriter::new();
            w.metadata = self.metadata.clone();
            for (i, t) in self.tensors.iter().enumerate() {
                let d = data.iter().find(|(j, _)| *j == i).map(|(_, d)| d.clone());
                w.tensors.push(PendingTensor {
                    name: t.name.clone(),
                    ty: t.ty,
                    shape: t.shape.clone(),
                    n_bytes: t.n_bytes,
                    data: d.or_else(|| t.data.clone()),
                });
            }
            w
        }
    }
}
