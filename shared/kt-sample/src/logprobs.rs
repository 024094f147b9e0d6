//! Log-probabilities of the raw logits (before penalties, bias, temperature and filters).

use serde::{Deserialize, Serialize};

use crate::sampler::check_logits;
use crate::SampleError;

/// One token and its natural-log probability.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct TokenLogprob {
    /// Token id.
    pub id: u32,
    /// ln(softmax(raw logits)[id]), computed in f64; -inf for a masked (-inf) logit.
    pub logprob: f64,
}

/// The chosen token's log-probability and the top alternatives.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Logprobs {
    /// The chosen token.
    pub chosen: TokenLogprob,
    /// The `top_n` most likely tokens, most likely first, ties to the lower id (the chosen
    /// token appears here too when it is among them).
    pub top: Vec<TokenLogprob>,
}

/// Natural-log softmax of the raw `logits`, in f64, for `chosen` and the `top_n` most likely.
pub fn logprobs(logits: &[f32], chosen: u32, top_n: usize) -> Result<Logprobs, SampleError> {
    check_logits(logits)?;
    let vocab = logits.len();
    let chosen_logit =
        *logits.get(chosen as usize).ok_or(SampleError::TokenOutOfRange { id: chosen, vocab })?;
    let max = logits.iter().map(|&l| l as f64).fold(f64::NEG_INFINITY, f64::max);
    if max == f64::NEG_INFINITY {
        return Err(SampleError::AllTokensBanned);
    }
    let lse = max + logits.iter().map(|&l| (l as f64 - max).exp()).sum::<f64>().ln();
    let lp = |l: f32| l as f64 - lse;

    let order = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    let mut all: Vec<(u32, f32)> = logits.iter().enumerate().map(|(i, &l)| (i as u32, l)).collect();
    let n = top_n.min(vocab);
    if n > 0 && n < vocab {
        all.select_nth_unstable_by(n - 1, order);
    }
    all.truncate(n);
    all.sort_unstable_by(order);
    Ok(Logprobs {
        chosen: TokenLogprob { id: chosen, logprob: lp(chosen_logit) },
        top: all.into_iter().map(|(id, l)| TokenLogprob { id, logprob: lp(l) }).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_plain_log_softmax() {
        let logits = [1.0f32, 3.0, 3.0, -2.0, 0.5];
        let z: f64 = logits.iter().map(|&l| (l as f64).exp()).sum();
        let want = |i: usize| (logits[i] as f64).exp().ln() - z.ln();
        let got = logprobs(&logits, 4, 3).unwrap();
        assert_eq!(got.chosen.id, 4);
        assert!((got.chosen.logprob - want(4)).abs() < 1e-12);
        let ids: Vec<u32> = got.top.iter().map(|t| t.id).collect();
        assert_eq!(ids, vec![1, 2, 0], "sorted, ties to the lower id");
        for t in &got.top {
            assert!((t.logprob - want(t.id as usize)).abs() < 1e-12);
        }
        let total: f64 = (0..5).map(|i| want(i).exp()).sum();
        assert!((total - 1.0).abs() < 1e-12);
    }

    #[test]
    fn large_logits_are_stable_and_top_n_clamps() {
        let logits = [1000.0f32, 999.0, f32::NEG_INFINITY];
        let got = logprobs(&logits, 2, 10).unwrap();
        assert_eq!(got.chosen.logprob, f64::NEG_INFINITY);
        assert_eq!(got.top.len(), 3);
        let want0 = -(1.0 + (-1.0f64).exp()).ln();
        assert!((got.top[0].logprob - want0).abs() < 1e-12);
        assert!(logprobs(&logits, 0, 0).unwrap().top.is_empty());
    }

    #[test]
    fn errors() {
        assert_eq!(logprobs(&[], 0, 1), Err(SampleError::EmptyLogits));
        assert_eq!(logprobs(&[0.0], 1, 1), Err(SampleError::TokenOutOfRange { id: 1, vocab: 1 }));
        assert!(logprobs(&[f32::NAN], 0, 1).is_err());
    }
}
