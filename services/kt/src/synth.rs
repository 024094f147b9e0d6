//! `kt synth`: writes a synthetic GGUF model with the real shapes of a known MoE model and
//! random but valid weights, for benchmarks without downloads. The work is in `kt-synth`.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use kt_synth::{Preset, Quant, SynthArch, SynthOptions};

#[derive(Clone, Copy, ValueEnum)]
enum ArchArg {
    Deepseek2,
    Deepseek3,
    Qwen3moe,
    Mixtral,
}

#[derive(Clone, Copy, ValueEnum)]
enum PresetArg {
    #[value(name = "v2-lite")]
    V2Lite,
    V3,
    #[value(name = "qwen3-30b-a3b")]
    Qwen3_30bA3b,
    #[value(name = "mixtral-8x7b")]
    Mixtral8x7b,
}

#[derive(Clone, Copy, ValueEnum)]
enum QuantArg {
    #[value(name = "q4_k_m")]
    Q4KM,
    #[value(name = "q8_0")]
    Q8_0,
    Bf16,
}

#[derive(Args)]
pub struct SynthArgs {
    /// The architecture; must be the preset's (checked), may be left out.
    #[arg(long, value_enum, env = "KT_SYNTH_ARCH")]
    arch: Option<ArchArg>,
    /// The model whose shape is copied.
    #[arg(long, value_enum, env = "KT_SYNTH_PRESET")]
    preset: PresetArg,
    /// Weight formats: llama.cpp's Q4_K_M mix, all Q8_0, or all BF16.
    #[arg(long, value_enum, default_value = "q4_k_m", env = "KT_SYNTH_QUANT")]
    quant: QuantArg,
    /// Keep only the first N layers (small test files).
    #[arg(long, env = "KT_SYNTH_LAYERS")]
    layers: Option<usize>,
    /// Vocabulary size instead of the preset's (small test files).
    #[arg(long, hide = true, env = "KT_SYNTH_VOCAB")]
    vocab: Option<usize>,
    /// Seed of the random weights (the same seed gives the same file).
    #[arg(long, default_value_t = 0, env = "KT_SYNTH_SEED")]
    seed: u64,
    /// The GGUF file to write.
    #[arg(short, long)]
    output: PathBuf,
}

pub fn run(a: SynthArgs) -> Result<()> {
    let preset = match a.preset {
        PresetArg::V2Lite => Preset::V2Lite,
        PresetArg::V3 => Preset::V3,
        PresetArg::Qwen3_30bA3b => Preset::Qwen3_30bA3b,
        PresetArg::Mixtral8x7b => Preset::Mixtral8x7b,
    };
    let quant = match a.quant {
        QuantArg::Q4KM => Quant::Q4KM,
        QuantArg::Q8_0 => Quant::Q8_0,
        QuantArg::Bf16 => Quant::Bf16,
    };
    let preset_arch = preset.shape().arch;
    if let Some(arch) = a.arch {
        let arch = match arch {
            ArchArg::Deepseek2 => SynthArch::Deepseek2,
            ArchArg::Deepseek3 => SynthArch::Deepseek3,
            ArchArg::Qwen3moe => SynthArch::Qwen3Moe,
            ArchArg::Mixtral => SynthArch::Mixtral,
        };
        if arch != preset_arch {
            bail!(
                "--arch {} does not match --preset {} (a {} model)",
                arch.name(),
                preset.name(),
                preset_arch.name()
            );
        }
    }
    let opts = SynthOptions { layers: a.layers, vocab: a.vocab, seed: a.seed, preset, quant };
    let t0 = Instant::now();
    let mut err = std::io::stderr().lock();
    let tty = err.is_terminal();
    let summary = kt_synth::write(&opts, &a.output, &mut |p| {
        if !tty {
            return;
        }
        let pct = 100.0 * p.bytes_done as f64 / p.bytes_total.max(1) as f64;
        let _ =
            write!(err, "\r\x1b[Kwriting {}/{} {:5.1}% {}", p.tensor + 1, p.n_tensors, pct, p.name);
        let _ = err.flush();
    })
    .with_context(|| format!("writing {}", a.output.display()))?;
    let secs = t0.elapsed().as_secs_f64();
    let s = &summary.shape;
    if tty {
        let _ = write!(err, "\r\x1b[K");
    }
    println!(
        "{}: synthetic {} {} ({} layers, hidden {}, {} experts top-{}, vocab {}), {} tensors, \
         {:.2} GiB in {:.1}s ({:.0} MB/s)",
        a.output.display(),
        s.model_name,
        quant.name(),
        s.n_layers,
        s.hidden,
        s.n_experts,
        s.top_k,
        s.vocab,
        summary.n_tensors,
        summary.file_bytes as f64 / (1u64 << 30) as f64,
        secs,
        summary.file_bytes as f64 / 1e6 / secs.max(1e-9)
    );
    Ok(())
}
