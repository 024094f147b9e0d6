use kt_core::GgmlType;

/// Why a quantization call was refused. Every length problem is reported here; the checked
/// entry points never panic on malformed input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuantError {
    /// The format has no kernel for this operation (e.g. IQ2_XXS, or quantizing to Q4_K).
    #[error("{op} is not supported for {ty}")]
    Unsupported { ty: GgmlType, op: &'static str },

    /// An element count that is not a whole number of blocks.
    #[error("{n} elements are not a whole number of {ty} blocks of {block}")]
    PartialBlock { ty: GgmlType, n: usize, block: usize },

    /// A byte length that is not a whole number of blocks.
    #[error("{bytes} bytes are not a whole number of {ty} blocks of {block_bytes} bytes")]
    PartialBlockBytes { ty: GgmlType, bytes: usize, block_bytes: usize },

    /// The byte size of `n` elements does not fit in `usize`.
    #[error("{n} elements of {ty} are too many to address")]
    TooLarge { ty: GgmlType, n: usize },

    /// A buffer whose length does not match the others.
    #[error("{what} has length {actual}, expected {expected} ({ty})")]
    Length { ty: GgmlType, what: &'static str, expected: usize, actual: usize },
}
