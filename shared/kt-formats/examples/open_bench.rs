//! How long opening a large GGUF model takes: `GgufModel::open` plus looking up every tensor.
//!
//! Creates (once) a synthetic ~10 GB model under `/tmp/kt-open-bench`: 400 Q4_K tensors of
//! shape [4096, 10752] and a 151,936-token vocabulary (tokens, scores, token types), written as
//! a sparse file so it takes a few MB of disk. The same model is also written as a 4-part split
//! set, and once more without the vocabulary (to show what parsing 152k strings costs). Then
//! opens each several times and prints min/median timings (warm page cache).
//!
//! ```text
//! cargo run --release -p kt-formats --example open_bench [-- --runs 10 --dir /tmp/kt-open-bench]
//! ```

use std::error::Error;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kt_core::GgmlType;
use kt_formats::gguf::writer::GgufWriter;
use kt_formats::{Array, GgufModel};

const TENSORS: usize = 400;
const SHAPE: [usize; 2] = [4096, 10752];
const VOCAB: usize = 151_936;
const SPLIT_PARTS: usize = 4;

fn main() -> Result<(), Box<dyn Error>> {
    let mut runs = 10usize;
    let mut dir = PathBuf::from("/tmp/kt-open-bench");
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match (a.as_str(), args.next()) {
            ("--runs", Some(v)) => runs = v.parse()?,
            ("--dir", Some(v)) => dir = v.into(),
            _ => return Err(format!("usage: open_bench [--runs N] [--dir PATH], got {a}").into()),
        }
    }
    std::fs::create_dir_all(dir.join("split"))?;

    let single = dir.join("model-10g.gguf");
    ensure(&single, &model_writers(1, true)?[0])?;
    let no_vocab = dir.join("model-10g-no-vocab.gguf");
    ensure(&no_vocab, &model_writers(1, false)?[0])?;
    let split: Vec<PathBuf> = (1..=SPLIT_PARTS)
        .map(|no| dir.join("split").join(format!("model-{no:05}-of-{SPLIT_PARTS:05}.gguf")))
        .collect();
    for (path, w) in split.iter().zip(model_writers(SPLIT_PARTS, true)?) {
        ensure(path, &w)?;
    }

    bench("single file", &single, runs, VOCAB)?;
    bench(&format!("{SPLIT_PARTS}-part split set (folder)"), &dir.join("split"), runs, VOCAB)?;
    bench("single file without the vocabulary", &no_vocab, runs, 0)?;
    Ok(())
}

/// The model as `parts` GGUF writers (split metadata included when `parts > 1`).
fn model_writers(parts: usize, vocab: bool) -> Result<Vec<GgufWriter>, Box<dyn Error>> {
    let per_part = TENSORS.div_ceil(parts);
    let mut out = Vec::new();
    for p in 0..parts {
        let mut w = GgufWriter::new();
        if p == 0 {
            w.metadata("general.architecture", "llama")
                .metadata("general.name", "open-bench synthetic")
                .metadata("llama.block_count", (TENSORS / 4) as u32)
                .metadata("llama.embedding_length", SHAPE[0] as u32);
        }
        if p == 0 && vocab {
            w.metadata("tokenizer.ggml.model", "gpt2")
                .metadata(
                    "tokenizer.ggml.tokens",
                    Array::String((0..VOCAB).map(|i| format!("Ġtoken{i}")).collect()),
                )
                .metadata(
                    "tokenizer.ggml.scores",
                    Array::F32((0..VOCAB).map(|i| -(i as f32)).collect()),
                )
                .metadata("tokenizer.ggml.token_type", Array::I32(vec![1; VOCAB]));
        }
        if parts > 1 {
            w.metadata("split.no", p as u16).metadata("split.count", parts as u16);
            if p == 0 {
                w.metadata("split.tensors.count", TENSORS as i32);
            }
        }
        for i in (p * per_part)..((p + 1) * per_part).min(TENSORS) {
            let name = format!(
                "blk.{}.{}.weight",
                i / 4,
                ["attn_q", "attn_output", "ffn_up", "ffn_down"][i % 4]
            );
            w.zero_tensor(name, GgmlType::Q4_K, SHAPE.to_vec())?;
        }
        out.push(w);
    }
    Ok(out)
}

/// Writes `w` to `path` unless a file of the right length is already there.
fn ensure(path: &Path, w: &GgufWriter) -> Result<(), Box<dyn Error>> {
    let want = w.file_len();
    if std::fs::metadata(path).map(|m| m.len()).ok() != Some(want) {
        let t0 = Instant::now();
        w.write(path)?;
        println!("wrote {} in {:.2?}", path.display(), t0.elapsed());
    }
    let m = std::fs::metadata(path)?;
    println!(
        "{}: {:.2} GB, {:.1} MB allocated on disk",
        path.display(),
        m.len() as f64 / 1e9,
        (m.blocks() * 512) as f64 / 1e6
    );
    Ok(())
}

fn bench(label: &str, path: &Path, runs: usize, vocab: usize) -> Result<(), Box<dyn Error>> {
    let mut open = Vec::new();
    let mut lookup = Vec::new();
    let mut total = Vec::new();
    let mut bytes = 0usize;
    for _ in 0..runs {
        let t0 = Instant::now();
        let model = GgufModel::open(path)?;
        let t1 = Instant::now();
        bytes = 0;
        for name in model.tensor_names() {
            bytes += model.tensor(&name)?.data.len();
        }
        let t2 = Instant::now();
        let tokens = model.metadata().get_array("tokenizer.ggml.tokens").map_or(0, |a| a.len());
        if tokens != vocab || model.tensor_names().len() != TENSORS {
            return Err(format!(
                "{label}: read {tokens} tokens and {} tensors",
                model.tensor_names().len()
            )
            .into());
        }
        drop(model);
        open.push(t1 - t0);
        lookup.push(t2 - t1);
        total.push(t2 - t0);
    }
    println!(
        "\n{label}: {TENSORS} tensors, {:.2} GB of tensor data, {vocab} tokens, {runs} runs",
        bytes as f64 / 1e9
    );
    for (what, times) in
        [("open", &mut open), ("look up all tensors", &mut lookup), ("total", &mut total)]
    {
        let (min, median) = stats(times);
        println!("  {what:<20} min {:>8.2} ms   median {:>8.2} ms", ms(min), ms(median));
    }
    Ok(())
}

fn stats(times: &mut [Duration]) -> (Duration, Duration) {
    times.sort();
    (
        times.first().copied().unwrap_or_default(),
        times.get(times.len() / 2).copied().unwrap_or_default(),
    )
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
