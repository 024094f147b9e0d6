//! `kt`: the command line around kt's engine.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use kt_chat_template::{ChatRequest, ChatTemplate, TemplateError};
use kt_models::{generate, GenerateParams, Generation, LoadedModel, MatmulMode, ModelSource};
use kt_sample::{Sampler, SamplingParams, StopChecker};
use kt_tokenize::Tokenizer;

mod bench;
mod chat;
mod embedded;
mod health;
mod plan;
mod serve;
mod synth;

#[derive(Parser)]
#[command(name = "kt", version, about = "Serve Mixture-of-Experts LLMs across GPUs and CPU DRAM")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve a model over HTTP (OpenAI, Ollama, web UI): gateway, worker and experts in one
    /// process.
    Serve(serve::ServeArgs),
    /// Generate tokens from a prompt (the scriptable entry point).
    Generate(GenerateArgs),
    /// Talk to a model in the terminal, turn after turn.
    Chat(chat::ChatArgs),
    /// Turn text into token ids, or ids back into text, with a model's tokenizer.
    Tokenize(TokenizeArgs),
    /// Check or show a placement plan (rules/*.yaml) against a model's config or GGUF header.
    Plan(plan::PlanArgs),
    /// Write a synthetic GGUF model with a known model's shapes and random valid weights.
    Synth(synth::SynthArgs),
    /// Measure kt's parts (`transport`: one worker ↔ expert hop per transport).
    Bench(bench::BenchArgs),
    /// Ask a gateway, worker or expert server whether it serves (exit 0) or not (exit 1).
    Healthcheck(health::HealthArgs),
}

#[derive(Clone, Copy, ValueEnum)]
enum Matmul {
    /// Exact f32 products against dequantized weights (the reference).
    F32,
    /// As llama.cpp's CPU backend computes on x86 (to reproduce its numbers).
    Ggml,
}

/// Which model to run.
#[derive(Args)]
pub struct ModelArgs {
    /// HF folder, GGUF file, or folder of GGUF files. Without it, kt uses its embedded default
    /// model (a tiny random-weight Qwen3-MoE).
    #[arg(long, env = "KT_MODEL")]
    model: Option<PathBuf>,
    /// GGUF weights (file or folder) to pair with the HF folder given by --model.
    #[arg(long, env = "KT_GGUF")]
    gguf: Option<PathBuf>,
    /// How activations meet quantized weights.
    #[arg(long, value_enum, default_value_t = Matmul::F32, env = "KT_MATMUL")]
    matmul: Matmul,
    /// Repack the routed experts to amx_int8 after loading (AMX on CPUs that have it) and
    /// compute calls of at least this many tokens (prefill) on them, shorter ones on the GGUF
    /// weights; 0: every call. Without it, the GGUF weights only.
    #[arg(long, env = "KT_INT8_FROM")]
    int8_from: Option<usize>,
}

/// How tokens are chosen.
#[derive(Args)]
pub struct SamplingArgs {
    /// 0 is greedy. Default: 0 for `generate`, 0.7 for `chat`.
    #[arg(long)]
    temperature: Option<f32>,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// 0 disables top-k.
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Keep tokens at least this fraction as likely as the most likely one; 0 disables.
    #[arg(long, default_value_t = 0.0)]
    min_p: f32,
    /// 1 disables.
    #[arg(long, default_value_t = 1.0)]
    repeat_penalty: f32,
    #[arg(long, default_value_t = 0.0)]
    presence_penalty: f32,
    #[arg(long, default_value_t = 0.0)]
    frequency_penalty: f32,
    /// Makes sampling reproducible.
    #[arg(long)]
    seed: Option<u64>,
    /// Stop before this text (repeatable); it is not printed.
    #[arg(long)]
    stop: Vec<String>,
}

impl SamplingArgs {
    fn params_with(&self, default_temperature: f32) -> SamplingParams {
        SamplingParams {
            temperature: self.temperature.unwrap_or(default_temperature),
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repetition_penalty: self.repeat_penalty,
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            seed: self.seed,
            stop: self.stop.clone(),
            ..SamplingParams::default()
        }
    }

    /// Parameters for interactive chat (temperature 0.7 unless given).
    pub fn params(&self) -> SamplingParams {
        self.params_with(0.7)
    }
}

#[derive(Args)]
struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// Prompt text (needs the model's tokenizer).
    #[arg(long, conflicts_with = "prompt_tokens", required_unless_present = "prompt_tokens")]
    prompt: Option<String>,
    /// Prompt as comma-separated token ids.
    #[arg(long, value_delimiter = ',')]
    prompt_tokens: Option<Vec<u32>>,
    /// Wrap --prompt in the model's chat template as one user message.
    #[arg(long, requires = "prompt")]
    chat: bool,
    #[arg(long, default_value_t = 16)]
    max_tokens: usize,
    /// Alternatives reported per token.
    #[arg(long, default_value_t = 0)]
    top_logprobs: usize,
    /// Keep generating after end-of-sequence tokens.
    #[arg(long)]
    ignore_eos: bool,
    /// Print exactly one JSON object on stdout.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct TokenizeArgs {
    /// HF folder, GGUF file (a vocab-only one is enough), or folder of GGUF files. Without it,
    /// the embedded default model's tokenizer.
    #[arg(long, env = "KT_MODEL")]
    model: Option<PathBuf>,
    #[arg(long, conflicts_with_all = ["file", "decode"])]
    text: Option<String>,
    /// Read the text from a file.
    #[arg(long, conflicts_with = "decode")]
    file: Option<PathBuf>,
    /// Comma-separated ids to turn back into text.
    #[arg(long, value_delimiter = ',')]
    decode: Option<Vec<u32>>,
    /// Print JSON (`{"ids": [..]}` or `{"text": ".."}`).
    #[arg(long)]
    json: bool,
    /// Encoding: add no BOS/EOS and treat special-token text as plain text. Decoding: leave
    /// special tokens out.
    #[arg(long)]
    no_special: bool,
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Serve(args) => serve::run(args),
        Command::Generate(args) => run_generate(args),
        Command::Chat(args) => chat::run(args),
        Command::Tokenize(args) => run_tokenize(args),
        Command::Plan(args) => plan::run(args),
        Command::Synth(args) => synth::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Healthcheck(args) => health::run(args),
    }
}

/// Loads the model `args` names (the embedded one without --model), its routed experts
/// repacked to amx_int8 on the global rayon pool when --int8-from asks.
pub fn load_model(args: &ModelArgs) -> Result<LoadedModel> {
    let mode = match args.matmul {
        Matmul::F32 => MatmulMode::F32,
        Matmul::Ggml => MatmulMode::Ggml,
    };
    let mut loaded = match &args.model {
        Some(path) => kt_models::load(path, args.gguf.as_deref(), mode)
            .with_context(|| format!("loading {}", path.display()))?,
        None if args.gguf.is_some() => bail!("--gguf needs --model (the HF folder it pairs with)"),
        None => embedded::load(mode)?,
    };
    if let Some(from) = args.int8_from {
        let t0 = Instant::now();
        let kernel = loaded.model.repack_experts_int8(from, |_, _| {})?;
        tracing::info!(
            secs = t0.elapsed().as_secs_f32(),
            "routed experts repacked to amx_int8; kernel: {kernel}"
        );
    }
    Ok(loaded)
}

/// The tokenizer that goes with the model at `path` (the embedded model's without one).
pub fn tokenizer_for(path: Option<&Path>) -> Result<Tokenizer> {
    match path {
        Some(p) => Tokenizer::for_model_path(p)
            .with_context(|| format!("reading the tokenizer of {}", p.display())),
        None => embedded::tokenizer(),
    }
}

/// The model's chat template, or the documented ChatML fallback when it has none.
pub fn template_for(loaded: &LoadedModel) -> Result<ChatTemplate> {
    let found = match &loaded.source {
        ModelSource::Hf(hf) | ModelSource::Paired { hf, .. } => {
            ChatTemplate::from_tokenizer_config(hf.dir().join("tokenizer_config.json"))
        }
        ModelSource::Gguf(g) => ChatTemplate::from_gguf(g.metadata()),
    };
    match found {
        Ok(t) => Ok(t),
        Err(TemplateError::Missing(what)) => {
            tracing::info!("{what} has no chat template; using the ChatML fallback");
            Ok(ChatTemplate::fallback())
        }
        Err(e) => Err(e.into()),
    }
}

fn run_tokenize(a: TokenizeArgs) -> Result<()> {
    let tok = tokenizer_for(a.model.as_deref())?;
    let mut out = std::io::stdout().lock();
    if let Some(ids) = &a.decode {
        let text = tok.decode(ids, a.no_special)?;
        if a.json {
            writeln!(out, "{}", serde_json::json!({ "text": text }))?;
        } else {
            writeln!(out, "{text}")?;
        }
        return Ok(());
    }
    let text = match (&a.text, &a.file) {
        (Some(t), _) => t.clone(),
        (None, Some(f)) => {
            std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?
        }
        (None, None) => bail!("give --text, --file or --decode"),
    };
    let special = !a.no_special;
    let ids = tok.encode_with(&text, special, special)?;
    if a.json {
        writeln!(out, "{}", serde_json::json!({ "ids": ids }))?;
    } else {
        let shown: Vec<String> = ids.iter().map(u32::to_string).collect();
        writeln!(out, "{}", shown.join(" "))?;
    }
    Ok(())
}

fn run_generate(a: GenerateArgs) -> Result<()> {
    let t0 = Instant::now();
    let loaded = load_model(&a.model)?;
    let load_s = t0.elapsed().as_secs_f64();
    // Text needs the tokenizer; with --prompt-tokens it is optional (no text then).
    let tokenizer = match &a.prompt {
        Some(_) => Some(tokenizer_for(a.model.model.as_deref())?),
        None => match tokenizer_for(a.model.model.as_deref()) {
            Ok(t) => Some(t),
            Err(e) => {
                tracing::info!("no tokenizer, output text will be empty: {e:#}");
                None
            }
        },
    };
    let prompt = match (&a.prompt_tokens, &a.prompt, &tokenizer) {
        (Some(ids), _, _) => ids.clone(),
        (None, Some(text), Some(tok)) if a.chat => {
            let req = ChatRequest {
                messages: vec![serde_json::json!({"role": "user", "content": text})],
                add_generation_prompt: true,
                ..Default::default()
            };
            // The template writes the special tokens (BOS included) itself.
            tok.encode_with(&template_for(&loaded)?.render(&req)?, false, true)?
        }
        (None, Some(text), Some(tok)) => tok.encode(text, true)?,
        _ => bail!("give --prompt or --prompt-tokens"),
    };
    let mut stop_ids = loaded.eos_ids.clone();
    if let Some(tok) = &tokenizer {
        stop_ids.extend(tok.eog_ids());
    }
    stop_ids.sort_unstable();
    stop_ids.dedup();
    let params = GenerateParams {
        max_tokens: a.max_tokens,
        top_logprobs: a.top_logprobs,
        stop_ids: if a.ignore_eos { Vec::new() } else { stop_ids },
    };
    let mut sampling = a.sampling.params_with(0.0);
    // Stop strings act on text, here; the sampler only chooses tokens.
    let mut stops = StopChecker::new(std::mem::take(&mut sampling.stop), Vec::new());
    let mut sampler = Sampler::new(sampling)?;
    let t1 = Instant::now();
    let mut stdout = std::io::stdout().lock();
    let json = a.json;
    let mut first = true;
    let mut stream = tokenizer.as_ref().map(|t| t.stream_decoder(true));
    let mut text = String::new();
    let mut stopped_by_text = false;
    let gen: Generation = generate(&loaded.model, &prompt, &params, &mut sampler, |t| {
        // Stream text when there is a tokenizer, ids otherwise.
        let (piece, hit) = match stream.as_mut() {
            Some(s) => {
                let out = stops.push_text(&s.push(t.id).ok().flatten().unwrap_or_default());
                (out.text, out.stop.is_some())
            }
            None => (format!("{}{}", if first { "" } else { " " }, t.id), false),
        };
        text.push_str(&piece);
        if !json {
            let _ = write!(stdout, "{piece}");
            let _ = stdout.flush();
        }
        first = false;
        stopped_by_text |= hit;
        !hit
    })?;
    if let Some(s) = stream.as_mut() {
        let tail = stops.push_text(&s.finish()).text + &stops.finish();
        text.push_str(&tail);
        if !json {
            write!(stdout, "{tail}")?;
        }
    }
    let gen_s = t1.elapsed().as_secs_f64();
    if json {
        let mut v = serde_json::to_value(&gen)?;
        if tokenizer.is_none() {
            text.clear();
        }
        v["text"] = serde_json::Value::String(text);
        if stopped_by_text {
            v["finish_reason"] = "stop".into();
        }
        writeln!(stdout, "{}", serde_json::to_string(&v)?)?;
    } else {
        writeln!(stdout)?;
        eprintln!(
            "{} prompt + {} generated tokens ({:?}); load {:.3}s, generate {:.3}s ({:.1} tok/s)",
            gen.prompt_tokens.len(),
            gen.tokens.len(),
            gen.finish_reason,
            load_s,
            gen_s,
            gen.tokens.len() as f64 / gen_s.max(1e-9)
        );
    }
    Ok(())
}
