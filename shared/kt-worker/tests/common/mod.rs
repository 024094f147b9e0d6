//! Helpers shared by the worker's tests: fixture models, and what a request gives when its
//! sequence runs alone through `kt_models::generate`.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use kt_models::{generate, GenerateParams, MatmulMode, Model};
use kt_sample::Sampler;
use kt_worker::{CpuBackend, Engine, EngineOptions, Event, Events, FinishReason, Request, Token};

pub const MODELS: &[&str] = &[
    "llama",
    "qwen2",
    "mixtral",
    "qwen2moe",
    "qwen3moe",
    "deepseek2-lite",
    "deepseek2-group",
    "deepseek3",
    "deepseek3-nolora",
];

pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models").join(name)
}

pub fn load(path: &Path) -> Arc<Model> {
    Arc::new(kt_models::load(path, None, MatmulMode::F32).unwrap().model)
}

/// The reference prompt of a fixture model.
pub fn reference_prompt(name: &str) -> Vec<u32> {
    let text = std::fs::read(fixture(name).join("reference/hf.json")).unwrap();
    let v: serde_json::Value = serde_json::from_slice(&text).unwrap();
    v["prompt_tokens"].as_array().unwrap().iter().map(|t| t.as_u64().unwrap() as u32).collect()
}

/// A prompt of `len` tokens, different for each `salt`.
pub fn prompt(len: usize, salt: usize, vocab: usize) -> Vec<u32> {
    (0..len).map(|t| ((t * 7 + salt * 13 + 1) % vocab) as u32).collect()
}

pub fn engine(
    model: &Arc<Model>,
    block_tokens: usize,
    blocks: usize,
    opts: EngineOptions,
) -> Engine {
    Engine::start(CpuBackend::new(model.clone(), block_tokens, blocks), opts).unwrap()
}

/// What `req` gives run alone in one process: tokens and finish reason.
pub fn alone(model: &Model, req: &Request) -> (Vec<Token>, FinishReason) {
    let room = model.config.max_position - req.prompt.len();
    let max_tokens = if req.max_tokens == 0 { room } else { req.max_tokens.min(room) };
    let params = GenerateParams {
        max_tokens,
        top_logprobs: req.top_logprobs,
        stop_ids: req.stop_ids.clone(),
    };
    let mut sampler = Sampler::new(req.sampling.clone()).unwrap();
    let g = generate(model, &req.prompt, &params, &mut sampler, |_| true).unwrap();
    let tokens = g
        .tokens
        .into_iter()
        .enumerate()
        .map(|(index, t)| Token {
            index,
            id: t.id,
            logprob: t.logprob,
            top_logprobs: t.top_logprobs,
        })
        .collect();
    let reason = match g.finish_reason {
        kt_models::FinishReason::Stop => FinishReason::Stop,
        kt_models::FinishReason::Length => FinishReason::Length,
        kt_models::FinishReason::Cancelled => FinishReason::Cancelled,
    };
    (tokens, reason)
}

/// Reads a sequence's events to the end (blocking): its tokens and the finished event.
pub fn collect(mut events: Events) -> (Vec<Token>, kt_worker::Finished) {
    let mut tokens = Vec::new();
    loop {
        match events.blocking_recv() {
            Some(Event::Token(t)) => tokens.push(t),
            Some(Event::Finished(f)) => {
                assert!(events.blocking_recv().is_none(), "events after the finished event");
                return (tokens, f);
            }
            None => panic!("the stream ended without a finished event"),
        }
    }
}
