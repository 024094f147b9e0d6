//! Batching must not change results: sequences of different lengths run together through
//! [`Model::forward_batch`] — prefill in chunks, decode steps of several sequences in one
//! iteration, sequences joining and leaving, blocks reused after a sequence ends — give
//! bit-identical logits to each sequence run alone, for every fixture architecture.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use kt_models::{KvPool, MatmulMode, Model, SeqKv, Step};

const MODELS: &[&str] = &[
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

fn load(name: &str, weights: &str, mode: MatmulMode) -> Model {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models").join(name);
    kt_models::load(&dir.join(weights), None, mode).unwrap().model
}

/// Greedy continuation of `prompt` alone: the logits after the prompt and after each
/// generated token.
fn alone(model: &Model, prompt: &[u32], steps: usize) -> Vec<Vec<f32>> {
    let mut seq = model.new_sequence();
    let mut out = vec![model.forward(&mut seq, prompt).unwrap()];
    for _ in 0..steps {
        let next = argmax(out.last().unwrap());
        out.push(model.forward(&mut seq, &[next]).unwrap());
    }
    out
}

fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best as u32
}

/// A sequence in the simulated scheduler.
struct Live {
    prompt: Vec<u32>,
    kv: SeqKv,
    /// Prompt tokens already prefilled.
    done: usize,
    /// Logits seen so far (after the prompt, then after each generated token).
    logits: Vec<Vec<f32>>,
    next: Option<u32>,
}

fn prompts(vocab: usize) -> Vec<Vec<u32>> {
    (0..6)
        .map(|i| (0..(3 + 5 * i)).map(|t| ((t * 7 + i * 13 + 1) % vocab) as u32).collect())
        .collect()
}

/// Runs the prompts together: two join at each iteration, each prefills in chunks of at most
/// `chunk` tokens, decodes `gen` tokens, then leaves (its blocks go back to the pool).
fn together(model: &Model, prompts: &[Vec<u32>], chunk: usize, gen: usize) -> Vec<Vec<Vec<f32>>> {
    // 36 blocks of 4: the six sequences need 33 together.
    let mut pool = KvPool::new(&model.config, 4, 36);
    let mut results: Vec<Option<Vec<Vec<f32>>>> = vec![None; prompts.len()];
    let mut live: Vec<(usize, Live)> = Vec::new();
    let mut waiting = 0;
    while results.iter().any(Option::is_none) {
        for _ in 0..2 {
            if waiting < prompts.len() {
                let prompt = prompts[waiting].clone();
                live.push((
                    waiting,
                    Live { prompt, kv: SeqKv::new(), done: 0, logits: Vec::new(), next: None },
                ));
                waiting += 1;
            }
        }
        let inputs: Vec<Vec<u32>> = live
            .iter()
            .map(|(_, s)| match s.next {
                Some(t) => vec![t],
                None => s.prompt[s.done..(s.done + chunk).min(s.prompt.len())].to_vec(),
            })
            .collect();
        let mut steps: Vec<Step<'_>> = live
            .iter_mut()
            .zip(&inputs)
            .map(|((_, s), tokens)| Step { kv: &mut s.kv, tokens })
            .collect();
        let logits = model.forward_batch(&mut pool, &mut steps).unwrap();
        drop(steps);
        for ((_, s), (tokens, l)) in live.iter_mut().zip(inputs.iter().zip(logits)) {
            if s.next.is_none() {
                s.done += tokens.len();
                if s.done < s.prompt.len() {
                    continue;
                }
            }
            s.next = Some(argmax(&l));
            s.logits.push(l);
        }
        live.retain_mut(|(i, s)| {
            if s.logits.len() == gen + 1 {
                pool.release(&mut s.kv);
                results[*i] = Some(std::mem::take(&mut s.logits));
                false
            } else {
                true
            }
        });
    }
    assert_eq!(pool.free_blocks(), pool.total_blocks(), "every block returned");
    results.into_iter().map(Option::unwrap).collect()
}

fn check(name: &str, weights: &str, mode: MatmulMode) {
    let model = load(name, weights, mode);
    let prompts = prompts(model.config.vocab_size);
    let gen = 5;
    let batched = together(&model, &prompts, 6, gen);
    for (i, prompt) in prompts.iter().enumerate() {
        let solo = alone(&model, prompt, gen);
        for (step, (a, b)) in solo.iter().zip(&batched[i]).enumerate() {
            let diff = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
            assert!(diff == 0.0, "{name} {weights}: prompt {i} step {step} differs by {diff}");
        }
    }
}

#[test]
fn batching_does_not_change_results_f32() {
    for m in MODELS {
        check(m, "hf", MatmulMode::F32);
    }
}

#[test]
fn batching_does_not_change_results_quantized() {
    for m in MODELS {
        check(m, "gguf/q4_k.gguf", MatmulMode::Ggml);
    }
}

#[test]
fn a_full_pool_refuses_a_step_and_takes_nothing() {
    let model = load("qwen3moe", "hf", MatmulMode::F32);
    let mut pool = KvPool::new(&model.config, 4, 3);
    let (mut a, mut b) = (SeqKv::new(), SeqKv::new());
    let (ta, tb) = ([1u32, 2, 3, 4, 5, 6, 7, 8], [9u32, 10, 11, 12, 13]);
    let mut steps = [Step { kv: &mut a, tokens: &ta }, Step { kv: &mut b, tokens: &tb }];
    let err = model.forward_batch(&mut pool, &mut steps).unwrap_err().to_string();
    assert!(err.contains("needs 4 blocks, 3 free"), "{err}");
    assert_eq!((pool.free_blocks(), a.len(), b.len()), (3, 0, 0));
    // A pool made for another model is refused.
    let other = load("llama", "hf", MatmulMode::F32);
    let mut foreign = KvPool::new(&other.config, 4, 3);
    let err = model.forward_batch(&mut foreign, &mut [Step { kv: &mut a, tokens: &ta }]);
    assert!(err.unwrap_err().to_string().contains("another model"));
}
