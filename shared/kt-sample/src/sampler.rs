//! The transform chain and [`Sampler`], which runs it with a token history and a seeded draw.
//!
//! See the crate docs for the order of the transforms.

use std::cmp::Ordering;
use std::collections::{BTreeMap, HashMap};

use crate::{Rng, SampleError, SamplingParams, BAN_BIAS};

/// One surviving token: its id and its (transformed) logit.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Candidate {
    /// Token id.
    pub id: u32,
    /// Current logit.
    pub logit: f32,
}

/// Logit descending, ties to the lower id: the order of every kept set.
fn by_logit_desc(a: &Candidate, b: &Candidate) -> Ordering {
    b.logit.total_cmp(&a.logit).then(a.id.cmp(&b.id))
}

/// Rejects NaN and +inf logits (-inf means "masked" and is allowed).
pub(crate) fn check_logits(logits: &[f32]) -> Result<(), SampleError> {
    if logits.is_empty() {
        return Err(SampleError::EmptyLogits);
    }
    match logits.iter().position(|l| l.is_nan() || *l == f32::INFINITY) {
        Some(i) => Err(SampleError::NonFiniteLogit { id: i as u32, value: logits[i] }),
        None => Ok(()),
    }
}

/// Repetition, presence and frequency penalties, llama.cpp / Hugging Face style.
///
/// For each distinct id seen `count` times in `window` (ids outside the vocabulary are
/// ignored): a positive logit is divided by `repetition`, a negative one multiplied by it;
/// then `presence + count * frequency` is subtracted.
pub fn apply_penalties(
    logits: &mut [f32],
    window: &[u32],
    repetition: f32,
    presence: f32,
    frequency: f32,
) {
    if window.is_empty() || (repetition == 1.0 && presence == 0.0 && frequency == 0.0) {
        return;
    }
    let mut counts: HashMap<u32, u32> = HashMap::new();
    for &id in window {
        if (id as usize) < logits.len() {
            *counts.entry(id).or_insert(0) += 1;
        }
    }
    for (id, count) in counts {
        let l = &mut logits[id as usize];
        if *l > 0.0 {
            *l /= repetition;
        } else {
            *l *= repetition;
        }
        *l -= presence + count as f32 * frequency;
    }
}

/// Adds `bias[id]` to `logits[id]`; a bias of [`BAN_BIAS`] or less sets the logit to -inf.
pub fn apply_logit_bias(logits: &mut [f32], bias: &BTreeMap<u32, f32>) -> Result<(), SampleError> {
    for (&id, &b) in bias {
        let vocab = logits.len();
        let l = logits.get_mut(id as usize).ok_or(SampleError::TokenOutOfRange { id, vocab })?;
        if b <= BAN_BIAS {
            *l = f32::NEG_INFINITY;
        } else {
            *l += b;
        }
    }
    Ok(())
}

/// Argmax, ties to the lowest id; `None` when every logit is -inf (or NaN).
pub fn greedy(logits: &[f32]) -> Option<u32> {
    let mut best: Option<(u32, f32)> = None;
    for (i, &l) in logits.iter().enumerate() {
        if l == f32::NEG_INFINITY || l.is_nan() {
            continue;
        }
        if best.is_none_or(|(_, b)| l > b) {
            best = Some((i as u32, l));
        }
    }
    best.map(|(i, _)| i)
}

/// Every token whose logit is not -inf, in id order.
pub fn candidates(logits: &[f32]) -> Vec<Candidate> {
    logits
        .iter()
        .enumerate()
        .filter(|(_, l)| **l != f32::NEG_INFINITY)
        .map(|(i, &logit)| Candidate { id: i as u32, logit })
        .collect()
}

/// Divides every logit by `temperature` (> 0; 1 leaves them alone).
pub fn apply_temperature(cands: &mut [Candidate], temperature: f32) {
    if temperature == 1.0 || temperature <= 0.0 {
        return;
    }
    for c in cands {
        c.logit /= temperature;
    }
}

/// Keeps the `k` highest logits (ties to the lower id); 0 disables. When `k > 0` the result is
/// sorted by logit descending.
pub fn top_k(cands: &mut Vec<Candidate>, k: usize) {
    if k == 0 {
        return;
    }
    if k < cands.len() {
        cands.select_nth_unstable_by(k - 1, by_logit_desc);
        cands.truncate(k);
    }
    cands.sort_unstable_by(by_logit_desc);
}

/// Unnormalised softmax weights `exp(logit - max)` in f64, and their sum.
fn weights(cands: &[Candidate]) -> (Vec<f64>, f64) {
    let max = cands.iter().map(|c| c.logit).fold(f32::NEG_INFINITY, f32::max) as f64;
    let w: Vec<f64> = cands.iter().map(|c| (c.logit as f64 - max).exp()).collect();
    let total = w.iter().sum();
    (w, total)
}

/// Softmax probabilities of the candidates, in f64, in their current order.
pub fn softmax(cands: &[Candidate]) -> Vec<f64> {
    let (mut w, total) = weights(cands);
    for x in &mut w {
        *x /= total;
    }
    w
}

/// Candidates sorted first when [`top_p`] tries a partial sort (the nucleus is usually far
/// smaller than the vocabulary, so sorting all of it is wasted work).
const TOP_P_PREFIX: usize = 1024;

/// Nucleus filter: sorts by logit descending and keeps the shortest prefix whose probability
/// reaches `p` (the token that crosses `p` is kept); `p >= 1` disables.
pub fn top_p(cands: &mut Vec<Candidate>, p: f32) {
    if p >= 1.0 || cands.len() <= 1 {
        return;
    }
    let (_, total) = weights(cands);
    let threshold = p as f64 * total;
    let max = cands.iter().map(|c| c.logit).fold(f32::NEG_INFINITY, f32::max) as f64;
    let prefix_len = |sorted: &[Candidate]| {
        let mut cum = 0.0;
        for (i, c) in sorted.iter().enumerate() {
            cum += (c.logit as f64 - max).exp();
            if cum >= threshold {
                return Some(i + 1);
            }
        }
        None
    };
    // Fast path: sort only the best TOP_P_PREFIX; the prefix of the full order is the same.
    if cands.len() > 2 * TOP_P_PREFIX {
        cands.select_nth_unstable_by(TOP_P_PREFIX - 1, by_logit_desc);
        cands[..TOP_P_PREFIX].sort_unstable_by(by_logit_desc);
        if let Some(keep) = prefix_len(&cands[..TOP_P_PREFIX]) {
            cands.truncate(keep);
            return;
        }
    }
    cands.sort_unstable_by(by_logit_desc);
    // Rounding can leave the sum just short of the threshold: keep everything then.
    let keep = prefix_len(cands).unwrap_or(cands.len());
    cands.truncate(keep.max(1));
}

/// Keeps tokens whose probability is at least `p` times the largest one (order preserved);
/// `p <= 0` disables.
pub fn min_p(cands: &mut Vec<Candidate>, p: f32) {
    if p <= 0.0 || cands.is_empty() {
        return;
    }
    let max = cands.iter().map(|c| c.logit).fold(f32::NEG_INFINITY, f32::max) as f64;
    let p = p as f64;
    cands.retain(|c| (c.logit as f64 - max).exp() >= p);
}

/// Draws one id from the softmax of the candidates, using one `rng.next_f64()`;
/// `None` when there are none.
pub fn draw(cands: &[Candidate], rng: &mut Rng) -> Option<u32> {
    let last = cands.last()?.id;
    let (w, total) = weights(cands);
    let u = rng.next_f64() * total;
    let mut cum = 0.0;
    for (c, x) in cands.iter().zip(&w) {
        cum += x;
        if u < cum {
            return Some(c.id);
        }
    }
    Some(last)
}

/// Turns logits into token ids with a fixed [`SamplingParams`], a token history for the
/// penalties, and a seeded generator.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: Rng,
    history: Vec<u32>,
    scratch: Vec<f32>,
}

impl Sampler {
    /// Validates `params` and seeds the generator from `params.seed` (entropy when `None`).
    pub fn new(params: SamplingParams) -> Result<Self, SampleError> {
        params.validate()?;
        let rng = params.seed.map_or_else(Rng::from_entropy, Rng::new);
        Ok(Self { params, rng, history: Vec::new(), scratch: Vec::new() })
    }

    /// The parameters.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Appends prompt ids to the history the penalties look at.
    pub fn add_prompt(&mut self, ids: &[u32]) {
        self.history.extend_from_slice(ids);
    }

    /// Appends one generated id to the history ([`Sampler::sample`] does this itself).
    pub fn accept(&mut self, id: u32) {
        self.history.push(id);
    }

    /// Prompt + generated ids so far.
    pub fn history(&self) -> &[u32] {
        &self.history
    }

    /// Runs the chain on `logits` and returns the chosen id, without recording it.
    pub fn pick(&mut self, logits: &[f32]) -> Result<u32, SampleError> {
        check_logits(logits)?;
        let p = &self.params;
        self.scratch.clear();
        self.scratch.extend_from_slice(logits);
        let window = match p.penalty_window {
            None => &self.history[..],
            Some(n) => &self.history[self.history.len().saturating_sub(n)..],
        };
        apply_penalties(
            &mut self.scratch,
            window,
            p.repetition_penalty,
            p.presence_penalty,
            p.frequency_penalty,
        );
        apply_logit_bias(&mut self.scratch, &p.logit_bias)?;
        if p.is_greedy() {
            return greedy(&self.scratch).ok_or(SampleError::AllTokensBanned);
        }
        let mut cands = candidates(&self.scratch);
        apply_temperature(&mut cands, p.temperature);
        top_k(&mut cands, p.top_k);
        top_p(&mut cands, p.top_p);
        min_p(&mut cands, p.min_p);
        draw(&cands, &mut self.rng).ok_or(SampleError::AllTokensBanned)
    }

    /// [`Sampler::pick`], then records the id in the history.
    pub fn sample(&mut self, logits: &[f32]) -> Result<u32, SampleError> {
        let id = self.pick(logits)?;
        self.accept(id);
        Ok(id)
    }
}

#[cfg(test)]
mod tests;
