//! `kt`: the command line around kt's engine.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use kt_models::{generate, GenerateParams, Generation, LoadedModel, MatmulMode};
use kt_tokenize::Tokenizer;

mod embedded;

#[derive(Parser)]
#[command(name = "kt", version, about = "Serve Mixture-of-Experts LLMs across GPUs and CPU DRAM")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate tokens from a prompt (the scriptable entry point).
    Generate(GenerateArgs),
    /// Turn text into token ids, or ids back into text, with a model's tokenizer.
    Tokenize(TokenizeArgs),
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

#[derive(Clone, Copy, ValueEnum)]
enum Matmul {
    /// Exact f32 products against dequantized weights (the reference).
    F32,
    /// Activations quantized as ggml's CPU backend does (to compare with llama.cpp).
    Ggml,
}

#[derive(Args)]
struct GenerateArgs {
    /// HF folder, GGUF file, or folder of GGUF files. Without it, kt uses its embedded default
    /// model (a tiny random-weight Qwen3-MoE).
    #[arg(long, env = "KT_MODEL")]
    model: Option<PathBuf>,
    /// GGUF weights (file or folder) to pair with the HF folder given by --model.
    #[arg(long, env = "KT_GGUF")]
    gguf: Option<PathBuf>,
    /// Prompt text (needs the model's tokenizer).
    #[arg(long, conflicts_with = "prompt_tokens", required_unless_present = "prompt_tokens")]
    prompt: Option<String>,
    /// Prompt as comma-separated token ids.
    #[arg(long, value_delimiter = ',')]
    prompt_tokens: Option<Vec<u32>>,
    #[arg(long, default_value_t = 16)]
    max_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// 0 disables top-k.
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Alternatives reported per token.
    #[arg(long, default_value_t = 0)]
    top_logprobs: usize,
    /// Keep generating after end-of-sequence tokens.
    #[arg(long)]
    ignore_eos: bool,
    /// Print exactly one JSON object on stdout.
    #[arg(long)]
    json: bool,
    /// How activations meet quantized weights.
    #[arg(long, value_enum, default_value_t = Matmul::F32, env = "KT_MATMUL")]
    matmul: Matmul,
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
        Command::Generate(args) => run_generate(args),
        Command::Tokenize(args) => run_tokenize(args),
    }
}

/// The tokenizer that goes with the model at `path` (the embedded model's without one).
fn tokenizer_for(path: Option<&std::path::Path>) -> Result<Tokenizer> {
    match path {
        Some(p) => Tokenizer::for_model_path(p)
            .with_context(|| format!("reading the tokenizer of {}", p.display())),
        None => embedded::tokenizer(),
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
    let mode = match a.matmul {
        Matmul::F32 => MatmulMode::F32,
        Matmul::Ggml => MatmulMode::Ggml,
    };
    let t0 = Instant::now();
    let loaded: LoadedModel = match &a.model {
        Some(path) => kt_models::load(path, a.gguf.as_deref(), mode)
            .with_context(|| format!("loading {}", path.display()))?,
        None => {
            if a.gguf.is_some() {
                bail!("--gguf needs --model (the HF folder it pairs with)");
            }
            embedded::load(mode)?
        }
    };
    let load_s = t0.elapsed().as_secs_f64();
    // Text needs the tokenizer; with --prompt-tokens it is optional (no text then).
    let tokenizer = match &a.prompt {
        Some(_) => Some(tokenizer_for(a.model.as_deref())?),
        None => match tokenizer_for(a.model.as_deref()) {
            Ok(t) => Some(t),
            Err(e) => {
                tracing::info!("no tokenizer, output text will be empty: {e:#}");
                None
            }
        },
    };
    let prompt = match (&a.prompt_tokens, &a.prompt, &tokenizer) {
        (Some(ids), _, _) => ids.clone(),
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
        temperature: a.temperature,
        top_p: a.top_p,
        top_k: a.top_k,
        seed: a.seed,
        top_logprobs: a.top_logprobs,
        stop_ids: if a.ignore_eos { Vec::new() } else { stop_ids },
    };
    let t1 = Instant::now();
    let mut stdout = std::io::stdout().lock();
    let json = a.json;
    let mut first = true;
    let mut stream = tokenizer.as_ref().map(|t| t.stream_decoder(true));
    let gen: Generation = generate(&loaded.model, &prompt, &params, |t| {
        if json {
            return;
        }
        // Stream text when there is a tokenizer, ids otherwise.
        let piece = match stream.as_mut() {
            Some(s) => s.push(t.id).ok().flatten().unwrap_or_default(),
            None => format!("{}{}", if first { "" } else { " " }, t.id),
        };
        let _ = write!(stdout, "{piece}");
        let _ = stdout.flush();
        first = false;
    })?;
    if let Some(s) = stream.as_mut() {
        if !json {
            write!(stdout, "{}", s.finish())?;
        }
    }
    let text = match &tokenizer {
        Some(tok) => {
            let ids: Vec<u32> = gen.tokens.iter().map(|t| t.id).collect();
            tok.decode(&ids, true)?
        }
        None => String::new(),
    };
    let gen_s = t1.elapsed().as_secs_f64();
    if json {
        let mut v = serde_json::to_value(&gen)?;
        v["text"] = serde_json::Value::String(text);
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
