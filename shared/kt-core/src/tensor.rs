use crate::{GgmlType, SharedBytes};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TensorError {
    #[error("tensor `{name}`: shape {shape:?} has {ne0} elements per row, not a whole number of {ty} blocks of {block}")]
    PartialBlock { name: String, shape: Vec<usize>, ne0: usize, ty: GgmlType, block: usize },
    #[error(
        "tensor `{name}`: shape {shape:?} of type {ty} needs {need} bytes, the data has {have}"
    )]
    SizeMismatch { name: String, shape: Vec<usize>, ty: GgmlType, need: u128, have: usize },
}

/// A weight tensor: its element type, its shape in row-major order (outermost dimension
/// first, as PyTorch writes it; the reverse of GGML's `ne`), and its bytes, which usually
/// point into a memory-mapped file.
#[derive(Clone, Debug)]
pub struct WeightTensor {
    pub name: String,
    pub ty: GgmlType,
    pub shape: Vec<usize>,
    pub data: SharedBytes,
}

impl WeightTensor {
    /// Checks that `data` holds exactly the bytes that `shape` and `ty` call for.
    pub fn new(
        name: impl Into<String>,
        ty: GgmlType,
        shape: Vec<usize>,
        data: SharedBytes,
    ) -> Result<Self, TensorError> {
        let name = name.into();
        let need = Self::byte_len(ty, &shape);
        let Some(need) = need else {
            let ne0 = shape.last().copied().unwrap_or(1);
            return Err(TensorError::PartialBlock { name, shape, ne0, ty, block: ty.block_size() });
        };
        if need != data.len() as u128 {
            return Err(TensorError::SizeMismatch { name, shape, ty, need, have: data.len() });
        }
        Ok(Self { name, ty, shape, data })
    }

    /// Bytes a tensor of this type and shape takes, or `None` when its rows are not whole
    /// blocks. Computed in u128 so that hostile shapes cannot overflow.
    pub fn byte_len(ty: GgmlType, shape: &[usize]) -> Option<u128> {
        let ne0 = shape.last().copied().unwrap_or(1);
        if !ne0.is_multiple_of(ty.block_size()) {
            return None;
        }
        let rows: u128 =
            shape[..shape.len().saturating_sub(1)].iter().map(|&d| d as u128).product();
        let row = (ne0 / ty.block_size()) as u128 * ty.type_size() as u128;
        rows.checked_mul(row)
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Elements per row (the innermost dimension).
    pub fn row_len(&self) -> usize {
        self.shape.last().copied().unwrap_or(1)
    }

    /// Number of rows (product of all but the innermost dimension).
    pub fn rows(&self) -> usize {
        self.shape[..self.shape.len().saturating_sub(1)].iter().product()
    }

    /// Bytes per row.
    pub fn row_bytes(&self) -> usize {
        (self.row_len() / self.ty.block_size()) * self.ty.type_size()
    }

    /// The bytes of row `i`, or `None` past the end.
    pub fn row(&self, i: usize) -> Option<&[u8]> {
        let rb = self.row_bytes();
        let start = i.checked_mul(rb)?;
        self.data.get(start..start.checked_add(rb)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks_byte_length() {
        let data = SharedBytes::new(vec![0u8; 2 * 3 * 4]);
        let t = WeightTensor::new("w", GgmlType::F32, vec![2, 3], data.clone()).unwrap();
        assert_eq!(t.rows(), 2);
        assert_eq!(t.row(1).unwrap().len(), 12);
        assert!(t.row(2).is_none());
        assert!(matches!(
            WeightTensor::new("w", GgmlType::F32, vec![3, 3], data.clone()),
            Err(TensorError::SizeMismatch { .. })
        ));
        assert!(matches!(
            WeightTensor::new("w", GgmlType::Q8_0, vec![1, 24], data),
            Err(TensorError::PartialBlock { .. })
        ));
    }
}
