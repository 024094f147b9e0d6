//! The decode loop: prompt → tokens, with the logprobs of the model's own distribution.

use serde::Serialize;

use kt_sample::Sampler;

use crate::ops::log_softmax;
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

#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct TokenLogprob {
    pub id: u32,
    pub logprob: f64,
}

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
        let lp = log_softmax(&logits);
        let id = sampler.sample(&logits)?;
        let top = top_logprobs(&lp, params.top_logprobs);
        let out = TokenOut { id, logprob: lp[id as usize], top_logprobs: top };
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

fn top_logprobs(lp: &[f64], k: usize) -> Vec<TokenLogprob> {
    let mut idx: Vec<usize> = (0..lp.len()).collect();
    idx.sort_by(|&a, &b| lp[b].total_cmp(&lp[a]).then(a.cmp(&b)));
    idx.truncate(k);
    idx.into_iter().map(|i| TokenLogprob { id: i as u32, logprob: lp[i] }).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_logprobs_are_sorted_with_ties_to_the_lower_id() {
        let lp = [-2.0, -0.5, -2.0, -1.0];
        let ids: Vec<u32> = top_logprobs(&lp, 3).iter().map(|t| t.id).collect();
        assert_eq!(ids, vec![1, 3, 0]);
    }
}
