//! Sampling on logits: turns one decode step's logits into a token id.
//!
//! The pieces:
//! - [`SamplingParams`]: the serde struct a request carries (OpenAI / llama.cpp field names),
//!   with [`SamplingParams::validate`] naming the bad parameter, its value and the reason.
//! - [`Sampler`]: owns the parameters, the token history (prompt + generated) and a seeded
//!   [`Rng`]; [`Sampler::sample`] runs the transform chain and the draw.
//! - The transforms as free functions ([`apply_penalties`], [`apply_logit_bias`],
//!   [`apply_temperature`], [`top_k`], [`top_p`], [`min_p`], [`draw`], [`greedy`]), so each
//!   can be tested and reused alone.
//! - [`logprobs`]: log-softmax of the raw logits (before any transform), in f64.
//! - [`StopChecker`]: stop token ids, stop strings over streamed text, max tokens.
//!
//! # Order of the transforms
//!
//! 1. repetition penalty, then presence and frequency penalties, over the penalty window
//!    (the last `penalty_window` ids of prompt + generated, default all of them);
//! 2. logit bias (a bias of -100 or less, or -inf, bans the id);
//! 3. temperature (0 means greedy: the argmax of the penalised, biased logits, ties to the
//!    lowest id, and steps 4-6 are skipped);
//! 4. top-k; 5. top-p (nucleus); 6. min-p;
//! 7. the draw from the softmax of what is left, with the sampler's seeded generator.
//!
//! This is the order of Hugging Face `generate`'s logits processors and warpers (penalties,
//! bias, temperature, top-k, top-p, min-p). Note that llama.cpp's default chain applies the
//! temperature after the filters, so with temperature != 1 its top-p / min-p sets can differ.
//!
//! Candidates are always ordered by logit descending, ties by lower id, so every step, and
//! therefore every seeded draw, is deterministic.

mod error;
mod logprobs;
mod params;
mod rng;
mod sampler;
mod stop;

pub use error::SampleError;
pub use logprobs::{logprobs, Logprobs, TokenLogprob};
pub use params::{SamplingParams, BAN_BIAS};
pub use rng::Rng;
pub use sampler::{
    apply_logit_bias, apply_penalties, apply_temperature, candidates, draw, greedy, min_p, softmax,
    top_k, top_p, Candidate, Sampler,
};
pub use stop::{StopChecker, StopOutput, StopReason};
