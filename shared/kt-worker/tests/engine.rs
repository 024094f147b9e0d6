//! The engine's scheduling must not change results: many concurrent sequences of different
//! lengths and sampling settings, chunked prefill, a cache too small for all of them
//! (admission waits, preemption recomputes), each give exactly the tokens and logprobs they
//! give alone. Cancellation frees blocks; an expert failure ends the affected sequences with
//! an error and the engine keeps serving.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use common::{alone, collect, engine, fixture, load, prompt};
use kt_models::{Experts, MatmulMode, Model, ModelError, Routing};
use kt_sample::SamplingParams;
use kt_worker::{EngineOptions, Event, FinishReason, Request, SubmitError};

/// 32 requests: prompts of 1..=63 tokens; greedy, seeded sampling with various filters and
/// penalties; different max_tokens (0 = up to the context), stop ids and top_logprobs.
fn requests(vocab: usize) -> Vec<Request> {
    (0..32)
        .map(|i| {
            let sampling = match i % 4 {
                0 => SamplingParams::greedy(),
                1 => {
                    SamplingParams { temperature: 0.8, seed: Some(i as u64), ..Default::default() }
                }
                2 => SamplingParams {
                    temperature: 1.2,
                    top_k: 20,
                    top_p: 0.9,
                    repetition_penalty: 1.3,
                    seed: Some(1000 + i as u64),
                    ..Default::default()
                },
                _ => SamplingParams {
                    temperature: 0.7,
                    min_p: 0.05,
                    presence_penalty: 0.5,
                    frequency_penalty: 0.25,
                    logit_bias: [(3, 2.0), (5, -100.0)].into_iter().collect(),
                    seed: Some(7 * i as u64),
                    ..Default::default()
                },
            };
            Request {
                id: format!("r{i}"),
                prompt: prompt(1 + (i * 37) % 63, i, vocab),
                sampling,
                max_tokens: [0, 5, 17, 40][i % 4 / 2 + (i / 8) % 3],
                stop_ids: if i % 5 == 0 { vec![(i * 11 % vocab) as u32, 7] } else { vec![] },
                top_logprobs: i % 6,
            }
        })
        .collect()
}

/// Submits every request at once and checks each against its run alone.
fn run_together(
    model: &Arc<Model>,
    block_tokens: usize,
    blocks: usize,
    opts: EngineOptions,
) -> u64 {
    let e = engine(model, block_tokens, blocks, opts);
    let reqs = requests(model.config.vocab_size);
    let streams: Vec<_> = reqs.iter().map(|r| e.submit(r.clone()).unwrap()).collect();
    for (r, events) in reqs.iter().zip(streams) {
        let (tokens, finished) = collect(events);
        let (want, reason) = alone(model, r);
        assert_eq!(tokens, want, "{}: tokens differ from the sequence run alone", r.id);
        assert_eq!(finished.reason, reason, "{}", r.id);
        assert_eq!(finished.completion_tokens, want.len(), "{}", r.id);
        assert_eq!(finished.prompt_tokens, r.prompt.len(), "{}", r.id);
        assert!(finished.message.is_empty());
    }
    let st = e.stats();
    assert_eq!((st.running, st.waiting), (0, 0));
    assert_eq!(st.free_blocks, st.total_blocks, "every block is back");
    st.preemptions
}

#[test]
fn thirty_two_concurrent_sequences_equal_each_alone() {
    for name in ["llama", "qwen3moe", "deepseek2-lite"] {
        let model = load(&fixture(name).join("hf"));
        // Chunked prefill: at most 24 tokens per iteration; the cache holds everything.
        let opts = EngineOptions { max_batch: 32, max_batch_tokens: 24 };
        run_together(&model, 16, 32 * 8, opts);
    }
}

#[test]
fn a_cache_too_small_for_all_still_finishes_every_request_identically() {
    let model = load(&fixture("mixtral").join("hf"));
    // 40 blocks of 4 positions: a few sequences at a time; decode growth runs the pool dry.
    let opts = EngineOptions { max_batch: 16, max_batch_tokens: 64 };
    let preemptions = run_together(&model, 4, 40, opts);
    assert!(preemptions > 0, "the pool was meant to run dry and preempt");
}

#[test]
fn gguf_quantized_models_batch_identically() {
    let model = Arc::new(
        kt_models::load(&fixture("deepseek3").join("gguf/q4_k.gguf"), None, MatmulMode::F32)
            .unwrap()
            .model,
    );
    run_together(&model, 8, 30, EngineOptions { max_batch: 8, max_batch_tokens: 32 });
}

#[test]
fn cancel_and_dropped_receivers_free_blocks() {
    let model = load(&fixture("qwen2").join("hf"));
    let e = engine(&model, 4, 64, EngineOptions::default());
    let total = e.model().total_blocks;
    let long = |id: &str| Request {
        id: id.into(),
        prompt: prompt(20, 1, 288),
        sampling: SamplingParams::greedy(),
        max_tokens: 0,
        stop_ids: vec![],
        top_logprobs: 0,
    };
    let mut a = e.submit(long("a")).unwrap();
    assert!(matches!(a.blocking_recv(), Some(Event::Token(_))));
    assert!(e.cancel("a"));
    let (_, fin) = collect(a);
    assert_eq!(fin.reason, FinishReason::Cancelled);
    assert!(!e.cancel("a"), "a finished id is not live");
    assert_eq!(e.stats().free_blocks, total);

    let mut b = e.submit(long("b")).unwrap();
    assert!(matches!(b.blocking_recv(), Some(Event::Token(_))));
    drop(b);
    // The scheduler sees the dropped receiver at its next iteration.
    let mut spins = 0;
    // (Counters are published after each iteration: wait until nothing runs or waits.)
    loop {
        let st = e.stats();
        if st.free_blocks == total && st.running == 0 && st.waiting == 0 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
        spins += 1;
        assert!(spins < 4000, "blocks of a dropped sequence never came back: {:?}", e.stats());
    }
    // The id is free again once the sequence ended.
    let (tokens, fin) = collect(e.submit(long("b")).unwrap());
    assert_eq!(fin.reason, FinishReason::Length);
    assert_eq!(tokens.len(), 128 - 20);
}

#[test]
fn bad_requests_are_refused_with_a_reason_and_the_engine_keeps_serving() {
    let model = load(&fixture("llama").join("hf"));
    let e = engine(&model, 16, 4, EngineOptions::default());
    let good = Request {
        id: "x".into(),
        prompt: vec![1, 2, 3],
        sampling: SamplingParams::greedy(),
        max_tokens: 4,
        stop_ids: vec![],
        top_logprobs: 2,
    };
    let bad = |f: &dyn Fn(&mut Request)| {
        let mut r = good.clone();
        f(&mut r);
        e.submit(r).err().unwrap()
    };
    assert_eq!(bad(&|r| r.id.clear()), SubmitError::EmptyId);
    assert_eq!(bad(&|r| r.prompt.clear()), SubmitError::EmptyPrompt);
    assert_eq!(
        bad(&|r| r.prompt[1] = 288),
        SubmitError::TokenOutOfVocab { index: 1, id: 288, vocab: 288 }
    );
    assert_eq!(bad(&|r| r.top_logprobs = 21), SubmitError::TopLogprobs(21));
    assert_eq!(
        bad(&|r| r.stop_ids = vec![1000]),
        SubmitError::StopOutOfVocab { id: 1000, vocab: 288 }
    );
    assert!(
        matches!(bad(&|r| r.sampling.temperature = -1.0), SubmitError::Sampling(m) if m.contains("temperature"))
    );
    assert_eq!(
        bad(&|r| r.prompt = vec![1; 128]),
        SubmitError::PromptTooLong { prompt: 128, context: 128 }
    );
    // 4 blocks of 16 hold 64 positions.
    assert_eq!(
        bad(&|r| r.prompt = vec![1; 70]),
        SubmitError::PromptExceedsCache { prompt: 70, needed: 5, total: 4 }
    );
    let msg = bad(&|r| r.prompt[1] = 288).to_string();
    assert!(msg.contains("288") && msg.contains("vocabulary"), "{msg}");

    let live = e.submit(Request { max_tokens: 0, ..good.clone() }).unwrap();
    assert_eq!(e.submit(good.clone()).err(), Some(SubmitError::DuplicateId("x".into())));
    e.cancel("x");
    collect(live);
    let (tokens, fin) = collect(e.submit(good.clone()).unwrap());
    assert_eq!((tokens, fin.reason), alone(&model, &good));
}

#[test]
fn the_context_limit_ends_with_length() {
    let model = load(&fixture("deepseek3").join("hf"));
    let e = engine(&model, 16, 16, EngineOptions::default());
    let r = Request {
        id: "c".into(),
        prompt: prompt(120, 3, 288),
        sampling: SamplingParams::greedy(),
        max_tokens: 50,
        stop_ids: vec![],
        top_logprobs: 0,
    };
    let (tokens, fin) = collect(e.submit(r.clone()).unwrap());
    assert_eq!((fin.reason, tokens.len()), (FinishReason::Length, 8));
    assert_eq!((tokens, fin.reason), alone(&model, &r));
}

/// Routed experts that fail while `fail` is set, as a lost expert server does.
struct Flaky {
    inner: kt_models::LocalExperts,
    fail: Arc<AtomicBool>,
}

impl Experts for Flaky {
    fn forward(
        &self,
        layer: usize,
        hidden: &[f32],
        routing: &Routing,
    ) -> Result<Vec<f32>, ModelError> {
        if self.fail.load(Ordering::SeqCst) {
            return Err(ModelError::Experts(
                "expert server numa1 is gone: connection reset".into(),
            ));
        }
        self.inner.forward(layer, hidden, routing)
    }
}

#[test]
fn an_expert_failure_ends_the_affected_sequences_and_the_engine_recovers() {
    let path = fixture("qwen2moe").join("hf");
    let parts = kt_models::open(&path, None, MatmulMode::F32).unwrap();
    let src = parts.source.tensors();
    let experts =
        kt_models::load_experts(&parts.config, src, parts.scheme, MatmulMode::F32, &|_, _| true)
            .unwrap();
    let fail = Arc::new(AtomicBool::new(false));
    let model =
        Model::load_with(parts.config.clone(), src, parts.scheme, MatmulMode::F32, &|_, _| false)
            .unwrap()
            .with_experts(Arc::new(Flaky { inner: experts, fail: fail.clone() }));
    let model = Arc::new(model);
    let e = engine(&model, 8, 64, EngineOptions::default());
    let req = |id: &str, salt| Request {
        id: id.into(),
        prompt: prompt(9, salt, 288),
        sampling: SamplingParams::greedy(),
        max_tokens: 0,
        stop_ids: vec![],
        top_logprobs: 1,
    };
    let mut streams: Vec<_> = (0..3).map(|i| e.submit(req(&format!("s{i}"), i)).unwrap()).collect();
    for s in &mut streams {
        assert!(matches!(s.blocking_recv(), Some(Event::Token(_))));
    }
    fail.store(true, Ordering::SeqCst);
    for s in streams {
        let (_, fin) = collect(s);
        assert_eq!(fin.reason, FinishReason::Error);
        assert!(fin.message.contains("expert") && fin.message.contains("numa1"), "{}", fin.message);
    }
    assert_eq!(e.stats().free_blocks, e.model().total_blocks);
    fail.store(false, Ordering::SeqCst);
    let r = Request { max_tokens: 12, ..req("after", 5) };
    let (tokens, fin) = collect(e.submit(r.clone()).unwrap());
    assert_eq!((tokens, fin.reason), alone(&model, &r));
}

#[test]
fn selective_experts_route_fewer_experts_per_token() {
    let path = fixture("mixtral").join("hf");
    let full = load(&path);
    let one = Arc::new(
        kt_models::load(&path, None, MatmulMode::F32)
            .unwrap()
            .model
            .with_experts_per_token(1)
            .unwrap(),
    );
    assert_eq!((full.experts_per_token(), one.experts_per_token()), (2, 1));
    let e = engine(&one, 16, 16, EngineOptions::default());
    assert_eq!(e.model().experts_per_token, 1);
    let r = Request {
        id: "k1".into(),
        prompt: prompt(12, 4, 288),
        sampling: SamplingParams::greedy(),
        max_tokens: 16,
        stop_ids: vec![],
        top_logprobs: 3,
    };
    let (tokens, _) = collect(e.submit(r.clone()).unwrap());
    assert_eq!(tokens, alone(&one, &r).0);
    assert_ne!(
        tokens,
        alone(&full, &r).0,
        "routing one expert instead of two changes the logprobs"
    );
    assert!(kt_models::load(&path, None, MatmulMode::F32)
        .unwrap()
        .model
        .with_experts_per_token(3)
        .is_err());
}
