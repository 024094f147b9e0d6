//! The model the gateway serves: its tokenizer, chat template, fill-in-the-middle tokens,
//! tool-call format, and the facts `/api/show` and `/v1/models` report (read from the GGUF
//! header or the Hugging Face `config.json`; no weights are loaded).

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use kt_chat_template::{
    ChatTemplate, TemplateError, GGUF_CHAT_TEMPLATE, GGUF_CHAT_TEMPLATE_TOOL_USE,
};
use kt_formats::{embedded, GgufModel, Metadata};
use kt_tokenize::Tokenizer;

use crate::error::GatewayError;
use crate::tools::ToolFormat;

/// Fill-in-the-middle token ids: the prompt is `prefix_id PREFIX suffix_id SUFFIX middle_id`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FimTokens {
    pub prefix: u32,
    pub suffix: u32,
    pub middle: u32,
}

/// Token texts of the known FIM families: (prefix, suffix, middle).
const FIM_TEXTS: &[(&str, &str, &str)] = &[
    ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"), // Qwen2.5-Coder, Qwen3-Coder
    ("<fim_prefix>", "<fim_suffix>", "<fim_middle>"),       // StarCoder, Granite
    ("<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>"), // DeepSeek-Coder, DeepSeek-V2/V3
    ("<PRE>", "<SUF>", "<MID>"),                            // CodeLlama
    ("<fim-prefix>", "<fim-suffix>", "<fim-middle>"),
];

/// Facts about the model for `/api/show`, `/api/tags` and `/v1/models`.
#[derive(Debug, Clone, Default)]
pub struct ModelFacts {
    /// `general.architecture` or the HF `model_type`, e.g. `qwen3moe`.
    pub arch: String,
    /// Ollama's `family` (the architecture).
    pub family: String,
    /// Parameter count (sum of tensor sizes), when known.
    pub parameter_count: Option<u64>,
    /// Weight format, e.g. `Q8_0`, `Q4_K_M`, `BF16`.
    pub quantization: String,
    /// Context length from the model's metadata.
    pub context_length: Option<u32>,
    /// `gguf` or `safetensors`.
    pub format: String,
    /// Size of the weight files in bytes.
    pub size_bytes: u64,
}

/// The served model.
#[derive(Debug)]
pub struct ModelCard {
    /// The id clients name in `model` (and `/v1/models` lists).
    pub name: String,
    pub tokenizer: Tokenizer,
    pub template: ChatTemplate,
    /// The template's source text (for `/api/show`); empty when the ChatML fallback is used.
    pub template_source: String,
    pub fim: Option<FimTokens>,
    pub tool_format: Option<ToolFormat>,
    pub facts: ModelFacts,
    /// Unix time the card was made (OpenAI's `created`).
    pub created: u64,
}

/// llama.cpp's `general.file_type` values, by name.
fn file_type_name(ft: u32) -> Option<&'static str> {
    Some(match ft {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        7 => "Q8_0",
        8 => "Q5_0",
        9 => "Q5_1",
        10 => "Q2_K",
        11 => "Q3_K_S",
        12 => "Q3_K_M",
        13 => "Q3_K_L",
        14 => "Q4_K_S",
        15 => "Q4_K_M",
        16 => "Q5_K_S",
        17 => "Q5_K_M",
        18 => "Q6_K",
        19 => "IQ2_XXS",
        20 => "IQ2_XS",
        21 => "Q2_K_S",
        22 => "IQ3_XS",
        23 => "IQ3_XXS",
        24 => "IQ1_S",
        25 => "IQ4_NL",
        26 => "IQ3_S",
        27 => "IQ3_M",
        28 => "IQ2_S",
        29 => "IQ2_M",
        30 => "IQ4_XS",
        31 => "IQ1_M",
        32 => "BF16",
        _ => return None,
    })
}

/// Ollama's `parameter_size`: `30.5B`, `1.2M`.
pub fn parameter_size(n: u64) -> String {
    let n = n as f64;
    if n >= 1e9 {
        format!("{:.1}B", n / 1e9)
    } else if n >= 1e6 {
        format!("{:.1}M", n / 1e6)
    } else if n >= 1e3 {
        format!("{:.1}K", n / 1e3)
    } else {
        format!("{n}")
    }
}

fn gguf_facts(g: &GgufModel) -> ModelFacts {
    let md = g.metadata();
    let arch = md.arch().unwrap_or("unknown").to_owned();
    let mut params: u64 = 0;
    let mut bytes_by_type: Vec<(String, usize)> = Vec::new();
    for t in g.tensor_infos() {
        params += t.numel() as u64;
        let name = t.ty.name().to_uppercase();
        match bytes_by_type.iter_mut().find(|(n, _)| *n == name) {
            Some((_, b)) => *b += t.n_bytes,
            None => bytes_by_type.push((name, t.n_bytes)),
        }
    }
    let quantization = md
        .get_u32("general.file_type")
        .and_then(file_type_name)
        .map(str::to_owned)
        .or_else(|| bytes_by_type.iter().max_by_key(|(_, b)| *b).map(|(n, _)| n.clone()))
        .unwrap_or_else(|| "unknown".into());
    let size_bytes = g.parts().iter().map(|p| p.bytes().len() as u64).sum();
    ModelFacts {
        family: arch.clone(),
        context_length: md.arch_get("context_length").and_then(|v| v.as_u32()),
        arch,
        parameter_count: (params > 0).then_some(params),
        quantization,
        format: "gguf".into(),
        size_bytes,
    }
}

fn hf_facts(dir: &Path) -> ModelFacts {
    let config: serde_json::Value = std::fs::read_to_string(dir.join("config.json"))
        .ok()
        .and_then(|s| serde_json::from_str(&s).ok())
        .unwrap_or_default();
    let arch = config["model_type"].as_str().unwrap_or("unknown").to_owned();
    let size_bytes = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .filter(|e| e.path().extension().is_some_and(|x| x == "safetensors"))
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0);
    ModelFacts {
        family: arch.clone(),
        arch,
        parameter_count: None,
        quantization: config["torch_dtype"]
            .as_str()
            .or(config["dtype"].as_str())
            .unwrap_or("unknown")
            .to_uppercase(),
        context_length: config["max_position_embeddings"].as_u64().map(|v| v as u32),
        format: "safetensors".into(),
        size_bytes,
    }
}

fn fim_of(tok: &Tokenizer, md: Option<&Metadata>) -> Option<FimTokens> {
    if let Some(md) = md {
        let key = |k: &str| md.get_u32(&format!("tokenizer.ggml.fim_{k}_token_id"));
        if let (Some(prefix), Some(suffix), Some(middle)) = (key("pre"), key("suf"), key("mid")) {
            return Some(FimTokens { prefix, suffix, middle });
        }
    }
    FIM_TEXTS.iter().find_map(|(p, s, m)| {
        Some(FimTokens {
            prefix: tok.token_to_id(p)?,
            suffix: tok.token_to_id(s)?,
            middle: tok.token_to_id(m)?,
        })
    })
}

/// A template, or the ChatML fallback when the model has none (with an empty source).
fn or_fallback(
    found: Result<(ChatTemplate, String), TemplateError>,
) -> Result<(ChatTemplate, String), GatewayError> {
    match found {
        Ok(t) => Ok(t),
        Err(TemplateError::Missing(what)) => {
            tracing::info!("{what} has no chat template; using the ChatML fallback");
            Ok((ChatTemplate::fallback(), String::new()))
        }
        Err(e) => Err(e.into()),
    }
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// The default model name: the file or folder name without `.gguf`.
fn name_of(path: &Path) -> String {
    let file = path.file_name().and_then(|n| n.to_str()).unwrap_or("model");
    file.strip_suffix(".gguf").unwrap_or(file).to_owned()
}

impl ModelCard {
    fn assemble(
        name: String,
        tokenizer: Tokenizer,
        template: (ChatTemplate, String),
        md: Option<&Metadata>,
        facts: ModelFacts,
    ) -> Self {
        let fim = fim_of(&tokenizer, md);
        let tool_format = ToolFormat::detect(&template.1);
        Self {
            name,
            tokenizer,
            template: template.0,
            template_source: template.1,
            fim,
            tool_format,
            facts,
            created: unix_now(),
        }
    }

    fn from_gguf_model(name: String, g: &GgufModel) -> Result<Self, GatewayError> {
        let md = g.metadata();
        let tokenizer = Tokenizer::from_gguf(md)?;
        let template = or_fallback(ChatTemplate::from_gguf(md).map(|t| {
            let src = md
                .get_str(GGUF_CHAT_TEMPLATE)
                .or_else(|| md.get_str(GGUF_CHAT_TEMPLATE_TOOL_USE))
                .unwrap_or_default()
                .to_owned();
            (t, src)
        }))?;
        Ok(Self::assemble(name, tokenizer, template, Some(md), gguf_facts(g)))
    }

    /// The embedded default model (the same bytes `kt` runs without `--model`), named
    /// `qwen3moe-tiny`.
    pub fn embedded() -> Result<Self, GatewayError> {
        let g = embedded::open()?;
        Self::from_gguf_model("qwen3moe-tiny".into(), &g)
    }

    /// The model at `path` (a GGUF file or folder, or a Hugging Face folder), named after the
    /// file unless `name` is given. Only headers, the vocabulary and the template are read.
    pub fn from_path(path: &Path, name: Option<String>) -> Result<Self, GatewayError> {
        let name = name.unwrap_or_else(|| name_of(path));
        let is_hf = path.is_dir() && path.join("tokenizer.json").is_file() && {
            let has_gguf = std::fs::read_dir(path)?
                .filter_map(Result::ok)
                .any(|e| e.path().extension().is_some_and(|x| x == "gguf"));
            !has_gguf
        };
        if is_hf {
            let tokenizer = Tokenizer::from_hf_dir(path)?;
            let config = path.join("tokenizer_config.json");
            let source = std::fs::read_to_string(&config)
                .ok()
                .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
                .and_then(|v| v["chat_template"].as_str().map(str::to_owned))
                .unwrap_or_default();
            let template =
                or_fallback(ChatTemplate::from_tokenizer_config(&config).map(|t| (t, source)))?;
            return Ok(Self::assemble(name, tokenizer, template, None, hf_facts(path)));
        }
        let g = GgufModel::open(path)?;
        Self::from_gguf_model(name, &g)
    }

    /// Replaces the chat template with `source` (a jinja file's text), e.g. to serve a model
    /// whose file lacks one, or to enable tool calls.
    pub fn with_template_source(mut self, source: &str) -> Result<Self, GatewayError> {
        let special = self.tokenizer.special_tokens();
        let text =
            |id: Option<u32>| id.and_then(|i| self.tokenizer.id_to_token(i)).map(str::to_owned);
        self.template = ChatTemplate::new(source, text(special.bos), text(special.eos))?;
        self.template_source = source.to_owned();
        self.tool_format = ToolFormat::detect(source);
        Ok(self)
    }

    /// Ids that end generation (sent to the worker as stop ids).
    pub fn eog_ids(&self) -> Vec<u32> {
        self.tokenizer.eog_ids().to_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_card_has_real_facts() {
        let card = ModelCard::embedded().unwrap();
        assert_eq!(card.facts.arch, "qwen3moe");
        assert_eq!(card.facts.quantization, "Q8_0");
        assert!(card.facts.parameter_count.unwrap() > 100_000);
        assert!(card.facts.context_length.is_some());
        assert!(card.tokenizer.vocab_size() > 0);
        assert_eq!(parameter_size(30_500_000_000), "30.5B");
        assert_eq!(parameter_size(1_234_567), "1.2M");
    }
}
