//! [`SamplingParams`]: what a request asks of the sampler, and its validation.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::SampleError;

/// A logit bias at or below this value bans the token (its logit becomes -inf), as in
/// OpenAI's `logit_bias` ("-100 should result in a ban").
pub const BAN_BIAS: f32 = -100.0;

/// Sampling parameters of one request. Every field has a neutral default
/// (`SamplingParams::default()` samples from the plain softmax at temperature 1).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SamplingParams {
    /// Softmax temperature, >= 0. 0 means greedy (argmax, ties to the lowest id).
    pub temperature: f32,
    /// Keep the `top_k` most likely tokens; 0 disables.
    pub top_k: usize,
    /// Nucleus: keep the smallest most-likely set whose probability reaches `top_p`, in (0, 1];
    /// 1 disables.
    pub top_p: f32,
    /// Keep tokens with probability >= `min_p` * (probability of the most likely), in [0, 1];
    /// 0 disables.
    pub min_p: f32,
    /// Repetition penalty (> 0; 1 disables): for each id seen in the penalty window, a positive
    /// logit is divided by it and a negative one multiplied.
    pub repetition_penalty: f32,
    /// Subtracted once from the logit of each id seen in the penalty window.
    pub presence_penalty: f32,
    /// Subtracted `count` times from the logit of each id seen `count` times in the window.
    pub frequency_penalty: f32,
    /// How many of the most recent ids (prompt + generated) the penalties look at;
    /// `None` means all of them, `Some(0)` turns the penalties off.
    pub penalty_window: Option<usize>,
    /// Added to the logit of the given id before sampling; [`BAN_BIAS`] or less (or -inf) bans.
    pub logit_bias: BTreeMap<u32, f32>,
    /// Seed of the generator; the same seed and the same logits give the same tokens.
    /// `None` seeds from entropy.
    pub seed: Option<u64>,
    /// Stop strings: generation ends before the first occurrence, which is not emitted.
    pub stop: Vec<String>,
    /// Stop token ids (in addition to the model's end-of-generation tokens, which the caller
    /// adds): generation ends at them and their text is not emitted.
    pub stop_token_ids: Vec<u32>,
    /// Upper bound on generated tokens; `None` leaves it to the context length.
    pub max_tokens: Option<usize>,
    /// Number of top alternatives to report log-probabilities for; `None` reports none.
    pub logprobs: Option<usize>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            penalty_window: None,
            logit_bias: BTreeMap::new(),
            seed: None,
            stop: Vec::new(),
            stop_token_ids: Vec::new(),
            max_tokens: None,
            logprobs: None,
        }
    }
}

fn invalid(name: &'static str, value: impl std::fmt::Display, reason: &'static str) -> SampleError {
    SampleError::InvalidParam { name, value: value.to_string(), reason }
}

impl SamplingParams {
    /// Greedy decoding (temperature 0), everything else default.
    pub fn greedy() -> Self {
        Self { temperature: 0.0, ..Self::default() }
    }

    /// True when sampling reduces to the argmax.
    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0 || self.top_k == 1
    }

    /// Rejects out-of-range values; the error names the parameter, the value and the reason.
    pub fn validate(&self) -> Result<(), SampleError> {
        let t = self.temperature;
        if !t.is_finite() || t < 0.0 {
            return Err(invalid("temperature", t, "must be a finite number >= 0"));
        }
        let p = self.top_p;
        if p.is_nan() || p <= 0.0 || p > 1.0 {
            return Err(invalid("top_p", p, "must be in (0, 1]"));
        }
        let m = self.min_p;
        if m.is_nan() || !(0.0..=1.0).contains(&m) {
            return Err(invalid("min_p", m, "must be in [0, 1]"));
        }
        let r = self.repetition_penalty;
        if !r.is_finite() || r <= 0.0 {
            return Err(invalid("repetition_penalty", r, "must be a finite number > 0"));
        }
        if !self.presence_penalty.is_finite() {
            return Err(invalid("presence_penalty", self.presence_penalty, "must be finite"));
        }
        if !self.frequency_penalty.is_finite() {
            return Err(invalid("frequency_penalty", self.frequency_penalty, "must be finite"));
        }
        for (&id, &b) in &self.logit_bias {
            if b.is_nan() || b == f32::INFINITY {
                return Err(invalid(
                    "logit_bias",
                    format!("{{{id}: {b}}}"),
                    "bias must be finite or -inf",
                ));
            }
        }
        if let Some(i) = self.stop.iter().position(String::is_empty) {
            return Err(invalid("stop", format!("[{i}] = \"\""), "stop strings must not be empty"));
        }
        if self.max_tokens == Some(0) {
            return Err(invalid("max_tokens", 0, "must be >= 1"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err_name(p: &SamplingParams) -> &'static str {
        match p.validate() {
            Err(SampleError::InvalidParam { name, .. }) => name,
            other => panic!("expected InvalidParam, got {other:?}"),
        }
    }

    #[test]
    fn default_is_valid_and_neutral() {
        let p = SamplingParams::default();
        assert!(p.validate().is_ok());
        assert!(!p.is_greedy());
        assert!(SamplingParams::greedy().is_greedy());
    }

    #[test]
    fn rejects_bad_values_naming_the_parameter() {
        let d = SamplingParams::default;
        let cases: Vec<(SamplingParams, &str)> = vec![
            (SamplingParams { temperature: -0.1, ..d() }, "temperature"),
            (SamplingParams { temperature: f32::NAN, ..d() }, "temperature"),
            (SamplingParams { temperature: f32::INFINITY, ..d() }, "temperature"),
            (SamplingParams { top_p: 0.0, ..d() }, "top_p"),
            (SamplingParams { top_p: 1.5, ..d() }, "top_p"),
            (SamplingParams { top_p: f32::NAN, ..d() }, "top_p"),
            (SamplingParams { min_p: -0.01, ..d() }, "min_p"),
            (SamplingParams { min_p: 1.01, ..d() }, "min_p"),
            (SamplingParams { min_p: f32::NAN, ..d() }, "min_p"),
            (SamplingParams { repetition_penalty: 0.0, ..d() }, "repetition_penalty"),
            (SamplingParams { repetition_penalty: -1.0, ..d() }, "repetition_penalty"),
            (SamplingParams { repetition_penalty: f32::NAN, ..d() }, "repetition_penalty"),
            (SamplingParams { presence_penalty: f32::NAN, ..d() }, "presence_penalty"),
            (SamplingParams { frequency_penalty: f32::INFINITY, ..d() }, "frequency_penalty"),
            (
                SamplingParams { logit_bias: [(3, f32::NAN)].into_iter().collect(), ..d() },
                "logit_bias",
            ),
            (
                SamplingParams { logit_bias: [(3, f32::INFINITY)].into_iter().collect(), ..d() },
                "logit_bias",
            ),
            (SamplingParams { stop: vec!["x".into(), String::new()], ..d() }, "stop"),
            (SamplingParams { max_tokens: Some(0), ..d() }, "max_tokens"),
        ];
        for (p, name) in cases {
            assert_eq!(err_name(&p), name, "{p:?}");
        }
    }

    #[test]
    fn error_message_carries_name_and_value() {
        let p = SamplingParams { top_p: 1.5, ..SamplingParams::default() };
        let msg = p.validate().unwrap_err().to_string();
        assert!(msg.contains("top_p") && msg.contains("1.5"), "{msg}");
    }

    #[test]
    fn accepts_edge_values() {
        let p = SamplingParams {
            temperature: 0.0,
            top_p: 1.0,
            min_p: 1.0,
            logit_bias: [(1, f32::NEG_INFINITY), (2, -100.0)].into_iter().collect(),
            ..SamplingParams::default()
        };
        assert!(p.validate().is_ok());
    }

    #[test]
    fn serde_round_trip_and_defaults() {
        let p: SamplingParams = serde_json::from_str(
            r#"{"temperature":0.7,"top_k":40,"logit_bias":{"50256":-100},"stop":["\n\n"],"seed":9}"#,
        )
        .unwrap();
        assert_eq!(p.temperature, 0.7);
        assert_eq!(p.top_k, 40);
        assert_eq!(p.top_p, 1.0);
        assert_eq!(p.logit_bias.get(&50256), Some(&-100.0));
        assert_eq!(p.seed, Some(9));
        let back: SamplingParams =
            serde_json::from_str(&serde_json::to_string(&p).unwrap()).unwrap();
        assert_eq!(back, p);
        let empty: SamplingParams = serde_json::from_str("{}").unwrap();
        assert_eq!(empty, SamplingParams::default());
    }
}
