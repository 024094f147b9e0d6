//! [`StopChecker`]: stop token ids, stop strings over streamed text, and max tokens.
//!
//! Text arrives in pieces (one per token, from a streaming detokenizer). A stop string may be
//! split across any number of pieces, so the checker holds back the longest suffix of the text
//! that could still be the start of a stop string and emits only what is safe. The stop string
//! itself, and anything after it, is never emitted.
//!
//! When several stop strings occur, the occurrence that *ends* first wins (it is the one a
//! stream sees complete first, whatever the split into pieces); among occurrences ending at the
//! same byte, the one that starts first (the longest).

use crate::SamplingParams;

/// Why generation stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    /// A stop token id was generated (its text is not emitted).
    TokenId(u32),
    /// A stop string was found (it is not emitted).
    StopString(String),
    /// The token budget was used up.
    MaxTokens,
}

/// What one push produced.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StopOutput {
    /// Text safe to emit now.
    pub text: String,
    /// Set once generation must stop (and on every push after that).
    pub stop: Option<StopReason>,
}

/// Watches streamed text and token ids for stop conditions.
#[derive(Debug, Clone, Default)]
pub struct StopChecker {
    stop_strings: Vec<String>,
    stop_ids: Vec<u32>,
    max_tokens: Option<usize>,
    tokens: usize,
    held: String,
    stopped: Option<StopReason>,
}

impl StopChecker {
    /// A checker for these stop strings (empty ones are ignored) and stop token ids.
    pub fn new(stop_strings: Vec<String>, stop_token_ids: Vec<u32>) -> Self {
        Self {
            stop_strings: stop_strings.into_iter().filter(|s| !s.is_empty()).collect(),
            stop_ids: stop_token_ids,
            ..Self::default()
        }
    }

    /// Also stop after `max_tokens` calls of [`StopChecker::push_token`].
    pub fn with_max_tokens(mut self, max_tokens: Option<usize>) -> Self {
        self.max_tokens = max_tokens;
        self
    }

    /// `stop`, `stop_token_ids` and `max_tokens` of the request. The caller adds the model's
    /// end-of-generation ids with [`StopChecker::add_stop_token_ids`].
    pub fn from_params(params: &SamplingParams) -> Self {
        Self::new(params.stop.clone(), params.stop_token_ids.clone())
            .with_max_tokens(params.max_tokens)
    }

    /// Adds stop token ids (e.g. the model's EOS / EOT ids).
    pub fn add_stop_token_ids(&mut self, ids: &[u32]) {
        self.stop_ids.extend_from_slice(ids);
    }

    /// Why generation stopped, once it has.
    pub fn stopped(&self) -> Option<&StopReason> {
        self.stopped.as_ref()
    }

    /// Tokens pushed so far with [`StopChecker::push_token`].
    pub fn tokens(&self) -> usize {
        self.tokens
    }

    /// Tokens left before `max_tokens`, if there is a budget.
    pub fn tokens_left(&self) -> Option<usize> {
        self.max_tokens.map(|m| m.saturating_sub(self.tokens))
    }

    fn stopped_output(&self) -> StopOutput {
        StopOutput { text: String::new(), stop: self.stopped.clone() }
    }

    fn stop_with(&mut self, text: String, reason: StopReason) -> StopOutput {
        self.held.clear();
        self.stopped = Some(reason.clone());
        StopOutput { text, stop: Some(reason) }
    }

    /// Feeds one generated token: its id, counted against `max_tokens`, and its text piece.
    /// A stop id ends generation without emitting its text; held-back text is flushed when
    /// generation ends on a stop id or the token budget.
    pub fn push_token(&mut self, id: u32, piece: &str) -> StopOutput {
        if self.stopped.is_some() {
            return self.stopped_output();
        }
        self.tokens += 1;
        if self.stop_ids.contains(&id) {
            let text = std::mem::take(&mut self.held);
            return self.stop_with(text, StopReason::TokenId(id));
        }
        let mut out = self.push_text(piece);
        if out.stop.is_none() && self.max_tokens.is_some_and(|m| self.tokens >= m) {
            out.text.push_str(&std::mem::take(&mut self.held));
            return self.stop_with(out.text, StopReason::MaxTokens);
        }
        out
    }

    /// Feeds one text piece; returns the text safe to emit and whether a stop string was hit.
    pub fn push_text(&mut self, piece: &str) -> StopOutput {
        if self.stopped.is_some() {
            return self.stopped_output();
        }
        self.held.push_str(piece);
        // The stop occurrence that ends first (ties: starts first).
        let mut hit: Option<(usize, usize, usize)> = None; // (end, start, index)
        for (k, s) in self.stop_strings.iter().enumerate() {
            if let Some(start) = self.held.find(s.as_str()) {
                let key = (start + s.len(), start, k);
                if hit.is_none_or(|h| (key.0, key.1) < (h.0, h.1)) {
                    hit = Some(key);
                }
            }
        }
        if let Some((_, start, k)) = hit {
            let text = self.held[..start].to_owned();
            let reason = StopReason::StopString(self.stop_strings[k].clone());
            return self.stop_with(text, reason);
        }
        // Hold back the longest suffix that is a proper prefix of some stop string.
        let cut = self
            .held
            .char_indices()
            .map(|(i, _)| i)
            .find(|&i| {
                let tail = &self.held[i..];
                self.stop_strings.iter().any(|s| s.starts_with(tail))
            })
            .unwrap_or(self.held.len());
        let rest = self.held.split_off(cut);
        let text = std::mem::replace(&mut self.held, rest);
        StopOutput { text, stop: None }
    }

    /// Generation ended for another reason: returns the held-back text (empty after a stop).
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

#[cfg(test)]
mod tests;
