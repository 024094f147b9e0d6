//! The decode loop: prompt → tokens, with the logprobs of the model's own distribution.

use serde::Serialize;

use crate::ops::log_softmax;
use crate::{Model, ModelError};

#[derive(Clone, Debug)]
pub struct GenerateParams {
    pub max_tokens: usize,
    /// 0 is greedy.
    pub temperature: f32,
    /// 1.0 disables nucleus filtering.
    pub top_p: f32,
    /// 0 disables top-k filtering.
    pub top_k: usize,
    pub seed: u64,
    /// Alternatives reported per step.
    pub top_logprobs: usize,
    /// Generation ends after any of these ids (end-of-sequence tokens).
    pub stop_ids: Vec<u32>,
}

impl Default for GenerateParams {
    fn default() -> Self {
        Self {
            max_tokens: 16,
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            seed: 0,
            top_logprobs: 0,
            stop_ids: Vec::new(),
        }
    }
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
    Length,
    Stop,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Generation {
    pub prompt_tokens: Vec<u32>,
    pub tokens: Vec<TokenOut>,
    pub finish_reason: FinishReason,
}

/// Generates up to `params.max_tokens` tokens after `prompt`; `on_token` sees each one as it
/// is chosen (for streaming).
pub fn generate(
    model: &Model,
    prompt: &[u32],
    params: &GenerateParams,
    mut on_token: impl FnMut(&TokenOut),
) -> Result<Generation, ModelError> {
    if prompt.is_empty() {
        return Err(ModelError::Input("the prompt has no tokens".into()));
    }
    if prompt.len() + params.max_tokens > model.config.max_position.max(prompt.len() + 1) {
        tracing::warn!(
            "prompt ({}) + max tokens ({}) exceed the model's context of {}",
            prompt.len(),
            params.max_tokens,
            model.config.max_position
        );
    }
    let mut seq = model.new_sequence();
    let mut rng = SplitMix64(params.seed);
    let mut tokens = Vec::new();
    let mut finish = FinishReason::Length;
    let mut logits = model.forward(&mut seq, prompt)?;
    for step in 0..params.max_tokens {
        let lp = log_softmax(&logits);
        let id = sample(&logits, params, &mut rng);
        let top = top_logprobs(&lp, params.top_logprobs);
        let out = TokenOut { id, logprob: lp[id as usize], top_logprobs: top };
        on_token(&out);
        tokens.push(out);
        if params.stop_ids.contains(&id) {
            finish = FinishReason::Stop;
            break;
        }
        if step + 1 < params.max_tokens {
            logits = model.forward(&mut seq, &[id])?;
        }
    }
    Ok(Generation { prompt_tokens: prompt.to_vec(), tokens, finish_reason: finish })
}

fn top_logprobs(lp: &[f64], k: usize) -> Vec<TokenLogprob> {
    let mut idx: Vec<usize> = (0..lp.len()).collect();
    idx.sort_by(|&a, &b| lp[b].total_cmp(&lp[a]).then(a.cmp(&b)));
    idx.truncate(k);
    idx.into_iter().map(|i| TokenLogprob { id: i as u32, logprob: lp[i] }).collect()
}

/// Picks a token: argmax at temperature 0, otherwise top-k → softmax(logits / T) → top-p →
/// a draw from the seeded generator.
fn sample(logits: &[f32], p: &GenerateParams, rng: &mut SplitMix64) -> u32 {
    if p.temperature <= 0.0 {
        let mut best = 0;
        for (i, v) in logits.iter().enumerate() {
            if *v > logits[best] {
                best = i;
            }
        }
        return best as u32;
    }
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    idx.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    if p.top_k > 0 {
        idx.truncate(p.top_k);
    }
    let max = logits[idx[0]] as f64;
    let mut probs: Vec<f64> =
        idx.iter().map(|&i| ((logits[i] as f64 - max) / p.temperature as f64).exp()).collect();
    let sum: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|q| *q /= sum);
    if p.top_p < 1.0 {
        let mut acc = 0.0;
        let mut keep = probs.len();
        for (j, q) in probs.iter().enumerate() {
            acc += q;
            if acc >= p.top_p as f64 {
                keep = j + 1;
                break;
            }
        }
        probs.truncate(keep);
        idx.truncate(keep);
        let s: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|q| *q /= s);
    }
    let r = rng.next_f64();
    let mut acc = 0.0;
    for (j, q) in probs.iter().enumerate() {
        acc += q;
        if r < acc {
            return idx[j] as u32;
        }
    }
    idx[idx.len() - 1] as u32
}

/// A small, well-mixed, seedable generator (SplitMix64); sampling is reproducible per seed.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_is_argmax() {
        let p = GenerateParams::default();
        assert_eq!(sample(&[0.1, 3.0, 2.0], &p, &mut SplitMix64(0)), 1);
    }

    #[test]
    fn top_k_one_is_greedy_at_any_temperature() {
        let p = GenerateParams { temperature: 5.0, top_k: 1, ..Default::default() };
        for s in 0..20 {
            assert_eq!(sample(&[0.1, 3.0, 2.0], &p, &mut SplitMix64(s)), 1);
        }
    }

    #[test]
    fn sampling_follows_the_distribution_and_the_seed() {
        let p = GenerateParams { temperature: 1.0, ..Default::default() };
        let logits = [0.0f32, (3.0f32).ln()]; // p = [0.25, 0.75]
        let mut rng = SplitMix64(7);
        let ones = (0..20000).filter(|_| sample(&logits, &p, &mut rng) == 1).count();
        assert!((ones as f64 / 20000.0 - 0.75).abs() < 0.02, "{ones}");
        let a: Vec<u32> = {
            let mut r = SplitMix64(3);
            (0..50).map(|_| sample(&logits, &p, &mut r)).collect()
        };
        let b: Vec<u32> = {
            let mut r = SplitMix64(3);
            (0..50).map(|_| sample(&logits, &p, &mut r)).collect()
        };
        assert_eq!(a, b);
    }

    #[test]
    fn top_p_cuts_the_tail() {
        let p = GenerateParams { temperature: 1.0, top_p: 0.5, ..Default::default() };
        let logits = [0.0f32, 10.0, 0.0];
        for s in 0..50 {
            assert_eq!(sample(&logits, &p, &mut SplitMix64(s)), 1);
        }
    }
}
