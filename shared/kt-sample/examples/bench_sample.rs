//! Prints the time per sampling step over a 152k vocabulary for a few parameter sets.
//!
//! `cargo run --release -p kt-sample --example bench_sample`

use std::time::Instant;

use kt_sample::{Rng, Sampler, SamplingParams};

fn main() -> Result<(), kt_sample::SampleError> {
    let vocab = 152_064;
    let mut r = Rng::new(1);
    let logits: Vec<f32> = (0..vocab).map(|_| (r.next_f64() * 20.0 - 10.0) as f32).collect();
    let d = SamplingParams::default;
    let cases = [
        ("greedy", SamplingParams::greedy()),
        ("plain", d()),
        ("top_k=40", SamplingParams { top_k: 40, ..d() }),
        ("top_p=0.9", SamplingParams { top_p: 0.9, ..d() }),
        ("min_p=0.05", SamplingParams { min_p: 0.05, ..d() }),
        (
            "penalties+top_k+top_p+min_p",
            SamplingParams {
                temperature: 0.8,
                top_k: 40,
                top_p: 0.95,
                min_p: 0.05,
                repetition_penalty: 1.1,
                presence_penalty: 0.5,
                ..d()
            },
        ),
    ];
    for (name, params) in cases {
        let mut s = Sampler::new(SamplingParams { seed: Some(1), ..params })?;
        s.add_prompt(&(0..2000).collect::<Vec<u32>>());
        let steps = 50;
        let t = Instant::now();
        for _ in 0..steps {
            s.sample(&logits)?;
        }
        let us = t.elapsed().as_secs_f64() * 1e6 / steps as f64;
        println!("{name:32} {us:10.1} us/step (vocab {vocab})");
    }
    Ok(())
}
