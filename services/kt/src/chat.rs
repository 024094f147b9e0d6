//! `kt chat`: a multi-turn conversation in the terminal, streamed token by token.
//!
//! The whole conversation is rendered through the model's chat template every turn; the KV
//! cache keeps the longest prefix the new prompt shares with what the model has already seen,
//! so a turn only computes its new tokens.

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Args;
use kt_chat_template::{ChatRequest, ChatTemplate};
use kt_models::{generate_in, FinishReason, GenerateParams, LoadedModel};
use kt_sample::{Sampler, StopChecker};
use kt_tokenize::Tokenizer;
use serde_json::{json, Value};

use crate::{load_model, template_for, tokenizer_for, ModelArgs, SamplingArgs};

#[derive(Args)]
pub struct ChatArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// System prompt.
    #[arg(long)]
    system: Option<String>,
    /// A file whose text is sent as the first user message.
    #[arg(long)]
    prompt_file: Option<PathBuf>,
    /// Most tokens per answer.
    #[arg(long, default_value_t = 512)]
    max_new_tokens: usize,
    /// Keep answering after end-of-sequence tokens (until --max-new-tokens or Ctrl-C).
    #[arg(long)]
    ignore_eos: bool,
}

/// One conversation: its messages and what the model's KV cache holds.
struct Conversation<'a> {
    loaded: &'a LoadedModel,
    tokenizer: &'a Tokenizer,
    template: &'a ChatTemplate,
    system: Option<String>,
    messages: Vec<Value>,
    seq: kt_models::Sequence,
    /// The token ids `seq` holds, in order.
    cached: Vec<u32>,
}

impl Conversation<'_> {
    fn clear(&mut self) {
        self.messages.clear();
        if let Some(s) = &self.system {
            self.messages.push(json!({"role": "system", "content": s}));
        }
        self.seq = self.loaded.model.new_sequence();
        self.cached.clear();
    }

    /// Answers `user`, streaming the reply to `out`; `stop` is raised by Ctrl-C.
    fn turn(
        &mut self,
        user: &str,
        args: &ChatArgs,
        stop: &AtomicBool,
        out: &mut impl Write,
    ) -> Result<FinishReason> {
        self.messages.push(json!({"role": "user", "content": user}));
        let req = ChatRequest {
            messages: self.messages.clone(),
            add_generation_prompt: true,
            ..Default::default()
        };
        let prompt = self.template.render(&req)?;
        // The template writes the special tokens (BOS included) itself.
        let ids = self.tokenizer.encode_with(&prompt, false, true)?;
        let shared = ids.iter().zip(&self.cached).take_while(|(a, b)| a == b).count();
        // At least one new token must be fed to get logits.
        let keep = shared.min(ids.len().saturating_sub(1));
        self.seq.truncate(keep);
        self.cached.truncate(keep);

        let mut sampling = args.sampling.params();
        let mut stops = StopChecker::new(std::mem::take(&mut sampling.stop), Vec::new());
        let mut sampler = Sampler::new(sampling)?;
        let mut stop_ids = Vec::new();
        if !args.ignore_eos {
            stop_ids.extend(&self.loaded.eos_ids);
            stop_ids.extend(self.tokenizer.eog_ids());
        }
        let params = GenerateParams { max_tokens: args.max_new_tokens, top_logprobs: 0, stop_ids };
        let mut stream = self.tokenizer.stream_decoder(true);
        let mut reply = String::new();
        stop.store(false, Ordering::SeqCst);
        let gen = generate_in(
            &self.loaded.model,
            &mut self.seq,
            &ids[keep..],
            &params,
            &mut sampler,
            |t| {
                let piece = stream.push(t.id).ok().flatten().unwrap_or_default();
                let emitted = stops.push_text(&piece);
                reply.push_str(&emitted.text);
                let _ = write!(out, "{}", emitted.text);
                let _ = out.flush();
                emitted.stop.is_none() && !stop.load(Ordering::SeqCst)
            },
        )?;
        let tail = stops.push_text(&stream.finish()).text + &stops.finish();
        reply.push_str(&tail);
        writeln!(out, "{tail}")?;
        // What the cache now holds: the prompt and every generated token but the last.
        self.cached.extend_from_slice(&ids[keep..]);
        let fed = gen.tokens.len().saturating_sub(1);
        self.cached.extend(gen.tokens[..fed].iter().map(|t| t.id));
        debug_assert_eq!(self.cached.len(), self.seq.len());
        self.messages.push(json!({"role": "assistant", "content": reply}));
        Ok(gen.finish_reason)
    }
}

pub fn run(args: ChatArgs) -> Result<()> {
    let loaded = load_model(&args.model)?;
    let tokenizer = tokenizer_for(args.model.model.as_deref())?;
    let template = template_for(&loaded)?;
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        // Ctrl-C stops the answer being written, not the program (/exit or Ctrl-D quits).
        ctrlc::set_handler(move || stop.store(true, Ordering::SeqCst))
            .context("installing the Ctrl-C handler")?;
    }
    let mut conv = Conversation {
        loaded: &loaded,
        tokenizer: &tokenizer,
        template: &template,
        system: args.system.clone(),
        messages: Vec::new(),
        seq: loaded.model.new_sequence(),
        cached: Vec::new(),
    };
    conv.clear();
    let stdin = std::io::stdin();
    let mut out = std::io::stdout();
    eprintln!(
        "kt chat: {} ({}). /clear starts over, /exit quits.",
        loaded.path.display(),
        loaded.model.config.arch.name()
    );
    let mut first = match &args.prompt_file {
        Some(f) => {
            Some(std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?)
        }
        None => None,
    };
    loop {
        let line = match first.take() {
            Some(text) => {
                writeln!(out, "> {}", text.trim_end())?;
                text
            }
            None => {
                write!(out, "> ")?;
                out.flush()?;
                let mut line = String::new();
                match stdin.lock().read_line(&mut line) {
                    Ok(0) => break,
                    Ok(_) => line,
                    // Ctrl-C while waiting for input interrupts the read: ask again.
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e.into()),
                }
            }
        };
        let text = line.trim();
        match text {
            "" => continue,
            "/exit" | "/quit" => break,
            "/clear" => {
                conv.clear();
                writeln!(out, "(conversation cleared)")?;
                continue;
            }
            _ => {}
        }
        let finish = conv.turn(text, &args, &stop, &mut out)?;
        if finish == FinishReason::Cancelled && stop.load(Ordering::SeqCst) {
            writeln!(out, "(stopped)")?;
        }
    }
    Ok(())
}
