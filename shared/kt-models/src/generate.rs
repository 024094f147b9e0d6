//! The decode loop: prompt → tokens, with the logprobs of the model's own distribution.

use serde::Serialize;

use kt_sample::Sampler;

use crate::{Model, ModelError, Sequence};

/// What bounds a generation; how tokens are chosen is the [`Sampler`]'s business.
#[derive(Clone, Debug, Default)]
pub struct GenerateParams {
    pub max_tokens: usize,
    /// Alternatives reported per step.
    pub top_logprobs: usize,
    /// Generation ends after any of these ids (end-of-generation tokens, stop token ids).
    pub stop_ids: Vec<u32>,
}

/// One token's natural-log probability (kt-sample's type: the same in every layer).
pub use kt_sample::TokenLogprob;

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TokenOut {
    pub id: u32,
    /// Natural-log probability of this token under the model's final logits (before any
    /// sampling transform).
    pub logprob: f64,
    pub top_logprobs: Vec<TokenLogprob>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    /// `max_tokens` reached.
    Length,
    /// A stop id was generated (it is the last token).
    Stop,
    /// The caller's callback asked to stop (a client went away, Ctrl-C, a stop string).
    Cancelled,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Generation {
    pub prompt_tokens: Vec<u32>,
    pub tokens: Vec<TokenOut>,
    pub finish_reason: FinishReason,
}

/// Generates up to `params.max_tokens` tokens after `prompt` in a fresh sequence; see
/// [`generate_in`].
pub fn generate(
    model: &Model,
    prompt: &[u32],
    params: &GenerateParams,
    sampler: &mut Sampler,
    on_token: impl FnMut(&TokenOut) -> bool,
) -> Result<Generation, ModelError> {
    generate_in(model, &mut model.new_sequence(), prompt, params, sampler, on_token)
}

/// Feeds `new_tokens` after what `seq` already holds, then generates up to
/// `params.max_tokens` tokens. `on_token` sees each token as it is chosen (for streaming) and
/// returns `false` to stop there. Every returned token except the last has been fed to `seq`,
/// so a conversation can go on from it.
pub fn generate_in(
    model: &Model,
    seq: &mut Sequence,
    new_tokens: &[u32],
    params: &GenerateParams,
    sampler: &mut Sampler,
    mut on_token: impl FnMut(&TokenOut) -> bool,
) -> Result<Generation, ModelError> {
    if new_tokens.is_empty() {
        return Err(ModelError::Input("the prompt has no tokens".into()));
    }
    let context = model.config.max_position;
    if seq.len() + new_tokens.len() + params.max_tokens > context {
        tracing::warn!(
            "{} cached + {} new prompt + {} max tokens exceed the model's context of {context}",
            seq.len(),
            new_tokens.len(),
            params.max_tokens
        );
    }
    sampler.add_prompt(new_tokens);
    let mut tokens = Vec::new();
    let mut finish = FinishReason::Length;
    let mut logits = model.forward(seq, new_tokens)?;
    for step in 0..params.max_tokens {
        let id = sampler.sample(&logits)?;
        // The raw logits' log-softmax, before any sampling transform.
        let lp = kt_sample::logprobs(&logits, id, params.top_logprobs)?;
        let out = TokenOut { id, logprob: lp.chosen.logprob, top_logprobs: lp.top };
        let go_on = on_token(&out);
        tokens.push(out);
        if params.stop_ids.contains(&id) {
            finish = FinishReason::Stop;
            break;
        }
        if !go_on {
            finish = FinishReason::Cancelled;
            break;
        }
        if step + 1 < params.max_tokens {
            logits = model.forward(seq, &[id])?;
        }
    }
    Ok(Generation { prompt_tokens: new_tokens.to_vec(), tokens, finish_reason: finish })
}
