//! Text to token ids and back, for the models kt serves.
//!
//! One [`Tokenizer`] type, built from either source a model comes in:
//!
//! * a Hugging Face folder: [`Tokenizer::from_hf_dir`] reads `tokenizer.json`, and
//!   `tokenizer_config.json` / `generation_config.json` when present, for the BOS/EOS tokens,
//!   whether BOS/EOS are added, and the ids that end generation;
//! * a GGUF file: [`Tokenizer::from_gguf`] rebuilds the tokenizer from the `tokenizer.ggml.*`
//!   metadata (byte-level BPE with a per-family pre-tokenizer, or SentencePiece), so that ids
//!   match what llama.cpp produces for the same file, which the vector tests check string by
//!   string.
//!
//! [`Tokenizer::for_model_path`] picks the source for a path the way `kt generate` gets it.
//!
//! The model part (normalizer, pre-tokenizer, BPE merges) runs on the Hugging Face
//! `tokenizers` crate. Everything around it follows llama.cpp's `llama_vocab`, for both
//! sources, so that the two behave alike:
//!
//! * [`Tokenizer::encode_with`]`(text, add_special, parse_special)` is llama.cpp's
//!   `tokenize(text, add_special, parse_special)`: special tokens written in the text
//!   (`<|im_start|>`) become their ids only with `parse_special`, user-defined (added, not
//!   special) tokens always do, and `add_special` adds BOS/EOS as the model asks.
//!   [`Tokenizer::encode`] parses special tokens, as a prompt rendered from a chat template
//!   needs.
//! * [`Tokenizer::decode`] joins the bytes of the tokens and makes text of them; a
//!   SentencePiece model drops the one space it put in front of the text. Unlike llama.cpp's
//!   `detokenize` for the GPT-2 and Llama 3 families, no "clean up" of spaces before
//!   punctuation is done: decoding is lossless.
//! * [`StreamDecoder`] hands the same text out token by token without ever splitting a
//!   character.

mod error;
mod export;
mod gguf;
mod hf;
mod pieces;
mod pretok;
mod stream;
mod vocab;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

pub use error::{Result, TokenizeError};
pub use kt_formats::Metadata;
pub use stream::StreamDecoder;
pub use vocab::{SpecialTokens, TokenKind};

use pieces::PieceStyle;
use vocab::{FimTokens, Fragment, TokenInfo};

/// A tokenizer for one model. Cheap to clone (the tables are shared) and usable from many
/// threads at once.
#[derive(Clone)]
pub struct Tokenizer {
    inner: Arc<Inner>,
}

struct Inner {
    /// Where it came from, for messages: a path, or the GGUF model's name.
    name: String,
    /// What kind of vocabulary it is, for messages and logs.
    family: String,
    /// Normalizer, pre-tokenizer and model, without added tokens or post-processor: those
    /// are handled here.
    model: tokenizers::Tokenizer,
    tokens: Vec<TokenInfo>,
    ids: HashMap<String, u32>,
    /// The bytes each id writes out when special tokens are shown.
    pieces: Vec<Box<[u8]>>,
    /// Ids matched in input text, longest first.
    order: Vec<u32>,
    special: SpecialTokens,
    /// Ids `add_special` puts before and after the text.
    prefix: Vec<u32>,
    suffix: Vec<u32>,
    /// Decoding drops one leading space of the first token (SentencePiece dummy prefix).
    strip_first_space: bool,
    /// Ids that end generation, sorted.
    eog: Vec<u32>,
    style: PieceStyle,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("name", &self.inner.name)
            .field("family", &self.inner.family)
            .field("vocab_size", &self.inner.tokens.len())
            .field("special", &self.inner.special)
            .finish()
    }
}

/// What a source hands over to become a [`Tokenizer`].
pub(crate) struct Parts {
    pub name: String,
    pub family: String,
    pub model: tokenizers::Tokenizer,
    pub tokens: Vec<TokenInfo>,
    pub ids: HashMap<String, u32>,
    pub style: PieceStyle,
    pub strip_first_space: bool,
    pub special: SpecialTokens,
    pub fim: FimTokens,
    pub prefix: Vec<u32>,
    pub suffix: Vec<u32>,
    pub extra_eog: Vec<u32>,
    /// Phi-3: special tokens swallow the white space after them (llama.cpp's rule).
    pub phi3_rstrip: bool,
}

impl Tokenizer {
    /// Loads `DIR/tokenizer.json`, with `DIR/tokenizer_config.json` and
    /// `DIR/generation_config.json` when they exist.
    pub fn from_hf_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let config = dir.join("tokenizer_config.json");
        let generation = dir.join("generation_config.json");
        hf::from_files(
            &dir.join("tokenizer.json"),
            config.is_file().then_some(config.as_path()),
            generation.is_file().then_some(generation.as_path()),
        )
    }

    /// Loads a `tokenizer.json`, with its `tokenizer_config.json` if given.
    pub fn from_hf_file(
        tokenizer_json: impl AsRef<Path>,
        tokenizer_config: Option<&Path>,
    ) -> Result<Self> {
        hf::from_files(tokenizer_json.as_ref(), tokenizer_config, None)
    }

    /// Rebuilds the tokenizer stored in GGUF metadata (`tokenizer.ggml.*`).
    pub fn from_gguf(md: &Metadata) -> Result<Self> {
        let name = match md.get_str("general.name") {
            Some(n) => format!("GGUF vocabulary of {n:?}"),
            None => "GGUF vocabulary".to_owned(),
        };
        gguf::from_metadata(md, &name)
    }

    /// Opens a GGUF file, split set or folder (weights or vocabulary only) and rebuilds its
    /// tokenizer.
    pub fn from_gguf_path(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let model = kt_formats::GgufModel::open(path)
            .map_err(|source| TokenizeError::Gguf { path: path.to_owned(), source })?;
        gguf::from_metadata(model.metadata(), &path.display().to_string())
    }

    /// The tokenizer of the model at `path`: a folder with `.gguf` files or a `.gguf` file
    /// (the GGUF vocabulary, which matches the weights' ids), otherwise a Hugging Face folder
    /// with `tokenizer.json`, or a `tokenizer.json` file itself.
    pub fn for_model_path(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let meta = std::fs::metadata(path)
            .map_err(|source| TokenizeError::Io { path: path.to_owned(), source })?;
        if meta.is_dir() {
            let entries = std::fs::read_dir(path)
                .map_err(|source| TokenizeError::Io { path: path.to_owned(), source })?;
            let has_gguf = entries.filter_map(|e| e.ok()).any(|e| {
                e.path()
                    .extension()
                    .and_then(|x| x.to_str())
                    .is_some_and(|x| x.eq_ignore_ascii_case("gguf"))
            });
            if has_gguf {
                return Self::from_gguf_path(path);
            }
            if path.join("tokenizer.json").is_file() {
                return Self::from_hf_dir(path);
            }
            return Err(TokenizeError::NotFound { path: path.to_owned() });
        }
        let is_json = path
            .extension()
            .and_then(|x| x.to_str())
            .is_some_and(|x| x.eq_ignore_ascii_case("json"));
        if is_json {
            let config = path.with_file_name("tokenizer_config.json");
            return Self::from_hf_file(path, config.is_file().then_some(config.as_path()));
        }
        Self::from_gguf_path(path)
    }

    pub(crate) fn from_parts(p: Parts) -> Self {
        let mut tokens = p.tokens;
        let mut special = p.special;
        let mut fim = p.fim;
        let eog = vocab::resolve_eog(&mut tokens, &p.ids, &mut special, &mut fim, &p.extra_eog);
        if p.phi3_rstrip {
            for t in tokens.iter_mut() {
                if t.kind.is_matched_in_text() || t.text == "</s>" {
                    t.rstrip = true;
                }
                if matches!(t.text.as_str(), "<unk>" | "<s>" | "<|endoftext|>") {
                    t.rstrip = false;
                }
            }
        }
        let order = vocab::partition_order(&tokens);
        let pieces = pieces::compute_pieces(&tokens, p.style);
        Self {
            inner: Arc::new(Inner {
                name: p.name,
                family: p.family,
                model: p.model,
                tokens,
                ids: p.ids,
                pieces,
                order,
                special,
                prefix: p.prefix,
                suffix: p.suffix,
                strip_first_space: p.strip_first_space,
                eog,
                style: p.style,
            }),
        }
    }

    /// Encodes `text`, recognising special tokens written in it (`parse_special` on) and
    /// adding BOS/EOS as the model asks when `add_special`.
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        self.encode_with(text, add_special, true)
    }

    /// llama.cpp's `tokenize(text, add_special, parse_special)`: with `parse_special` off,
    /// control tokens written in the text are tokenized as plain text (user-defined tokens are
    /// still recognised); `add_special` adds the model's BOS/EOS ids.
    pub fn encode_with(
        &self,
        text: &str,
        add_special: bool,
        parse_special: bool,
    ) -> Result<Vec<u32>> {
        let inner = &*self.inner;
        let mut out = Vec::with_capacity(text.len() / 3 + 4);
        if add_special {
            out.extend_from_slice(&inner.prefix);
        }
        for frag in vocab::partition(text, &inner.tokens, &inner.order, parse_special) {
            match frag {
                Fragment::Token(id) => out.push(id),
                Fragment::Text(s) => {
                    let enc = inner
                        .model
                        .encode_fast(s, false)
                        .map_err(|e| TokenizeError::hf(&inner.name, e))?;
                    out.extend_from_slice(enc.get_ids());
                }
            }
        }
        if add_special {
            out.extend_from_slice(&inner.suffix);
        }
        Ok(out)
    }

    /// The text of `ids`. With `skip_special`, control and unknown tokens write nothing.
    /// Invalid UTF-8 (an id sequence that splits a character) comes out as U+FFFD.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        let mut bytes = Vec::with_capacity(ids.len() * 4);
        for (i, &id) in ids.iter().enumerate() {
            bytes.extend_from_slice(self.piece_for_decode(id, skip_special, i == 0)?);
        }
        Ok(match String::from_utf8(bytes) {
            Ok(s) => s,
            Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
        })
    }

    /// The bytes one token writes out (part of a character, possibly), as llama.cpp's
    /// `token_to_piece`: nothing for a special token when `skip_special`, no leading space
    /// removed.
    pub fn token_to_piece(&self, id: u32, skip_special: bool) -> Result<&[u8]> {
        let inner = &*self.inner;
        let (Some(info), Some(piece)) =
            (inner.tokens.get(id as usize), inner.pieces.get(id as usize))
        else {
            return Err(TokenizeError::TokenOutOfRange { id, vocab_size: inner.tokens.len() });
        };
        if skip_special && info.kind.is_special() {
            return Ok(&[]);
        }
        Ok(piece)
    }

    /// A token's piece as `decode` uses it: the first token of a sequence loses the dummy
    /// space a SentencePiece model put in front of the text.
    pub(crate) fn piece_for_decode(
        &self,
        id: u32,
        skip_special: bool,
        first: bool,
    ) -> Result<&[u8]> {
        let piece = self.token_to_piece(id, skip_special)?;
        if first && self.inner.strip_first_space {
            return Ok(piece.strip_prefix(b" ".as_slice()).unwrap_or(piece));
        }
        Ok(piece)
    }

    /// A streaming decoder over this tokenizer (see [`StreamDecoder`]).
    pub fn stream_decoder(&self, skip_special: bool) -> StreamDecoder {
        StreamDecoder::new(self.clone(), skip_special)
    }

    /// Number of ids (the largest id plus one).
    pub fn vocab_size(&self) -> usize {
        self.inner.tokens.len()
    }

    /// The token as stored in the vocabulary (byte-level alphabet, `▁`, `<0x0A>`, ...).
    pub fn id_to_token(&self, id: u32) -> Option<&str> {
        self.inner.tokens.get(id as usize).map(|t| t.text.as_str())
    }

    /// The id of a token as stored in the vocabulary.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.ids.get(token).copied()
    }

    pub fn token_kind(&self, id: u32) -> Option<TokenKind> {
        self.inner.tokens.get(id as usize).map(|t| t.kind)
    }

    /// Control or unknown token (what `skip_special` hides).
    pub fn is_special(&self, id: u32) -> bool {
        self.token_kind(id).is_some_and(TokenKind::is_special)
    }

    /// Whether generating `id` ends the sequence (EOS, EOT, EOM, and the end-of-turn tokens
    /// of the known families).
    pub fn is_eog(&self, id: u32) -> bool {
        self.inner.eog.binary_search(&id).is_ok()
    }

    /// All end-of-generation ids, sorted.
    pub fn eog_ids(&self) -> &[u32] {
        &self.inner.eog
    }

    pub fn special_tokens(&self) -> &SpecialTokens {
        &self.inner.special
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.inner.special.bos
    }

    pub fn eos_id(&self) -> Option<u32> {
        self.inner.special.eos
    }

    pub fn eot_id(&self) -> Option<u32> {
        self.inner.special.eot
    }

    pub fn unk_id(&self) -> Option<u32> {
        self.inner.special.unk
    }

    pub fn pad_id(&self) -> Option<u32> {
        self.inner.special.pad
    }

    /// Whether `add_special` puts BOS in front.
    pub fn add_bos(&self) -> bool {
        self.inner.special.bos.is_some_and(|b| self.inner.prefix.contains(&b))
    }

    /// Whether `add_special` puts EOS at the end.
    pub fn add_eos(&self) -> bool {
        self.inner.special.eos.is_some_and(|e| self.inner.suffix.contains(&e))
    }

    /// The ids `add_special` puts before and after the text.
    pub fn added_special_ids(&self) -> (&[u32], &[u32]) {
        (&self.inner.prefix, &self.inner.suffix)
    }

    /// Where the tokenizer came from (a path or the GGUF model's name).
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The vocabulary kind and pre-tokenizer family, e.g. `gpt2 (qwen2)`.
    pub fn family(&self) -> &str {
        &self.inner.family
    }
}
