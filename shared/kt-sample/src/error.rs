//! Errors of parameter validation and sampling.

/// What can go wrong when validating parameters or sampling.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SampleError {
    /// A sampling parameter is out of its range.
    #[error("invalid sampling parameter {name} = {value}: {reason}")]
    InvalidParam {
        /// Parameter name as it appears in [`crate::SamplingParams`].
        name: &'static str,
        /// The rejected value, formatted.
        value: String,
        /// Why it was rejected.
        reason: &'static str,
    },
    /// The logits slice is empty.
    #[error("empty logits")]
    EmptyLogits,
    /// A logit is NaN or +inf (-inf is allowed and means "masked").
    #[error("logit of token {id} is {value}")]
    NonFiniteLogit {
        /// Token id.
        id: u32,
        /// The offending value.
        value: f32,
    },
    /// A token id (in logit bias, or the chosen id for logprobs) is outside the vocabulary.
    #[error("token id {id} out of range for vocabulary of {vocab}")]
    TokenOutOfRange {
        /// Token id.
        id: u32,
        /// Vocabulary size (length of the logits).
        vocab: usize,
    },
    /// Every token has logit -inf after penalties and bias.
    #[error("every token is banned (all logits are -inf)")]
    AllTokensBanned,
}
