//! Chat templates: turning a conversation (OpenAI-style messages, tools) into the prompt text
//! a model was trained on, exactly as Hugging Face transformers' `apply_chat_template` does.
//!
//! Models ship their prompt format as a jinja2 template, in `tokenizer_config.json`
//! ([`ChatTemplate::from_tokenizer_config`]) or in GGUF metadata
//! ([`ChatTemplate::from_gguf`]). kt renders them with minijinja in an environment that
//! reproduces transformers' jinja2 setup (see the `env` module): `trim_blocks` and
//! `lstrip_blocks`, loop controls, the `{% generation %}` tag, the `tojson` filter
//! (`json.dumps` with `ensure_ascii=False`, key order kept), `raise_exception`,
//! `strftime_now`, Python string/dict methods and Python's printing of `None`, `True` and
//! containers.
//!
//! The test `tests/transformers_parity.rs` renders 70 real templates (DeepSeek, Qwen, Llama,
//! Mistral, Gemma, Kimi, GLM, MiniMax, gpt-oss, ...) for six conversations (multi-turn, with
//! a system prompt, a tool call, parallel typed tool calls, reasoning in the history, thinking
//! off) and compares the text byte for byte with what transformers produced
//! (`tests/fixtures/chat-templates/record.py` records it); where transformers raises, kt must
//! fail too.
//!
//! # Differences from transformers
//!
//! Every recorded case matches byte for byte except the two tool cases of one template. What kt
//! knowingly does differently:
//!
//! * `'text'|safe + value`: jinja2's `Markup.__add__` HTML-escapes the plain operand;
//!   minijinja only does so with auto-escaping on, so kt concatenates unescaped (this is the
//!   one recorded difference: functionary-medium-v3.1 with tools).
//! * `~` prints a none or boolean operand the minijinja way (`none`, `true`) rather than
//!   Python's (`None`, `True`); `{{ }}`, `| string` and `| join` print them Python's way.
//! * Only the top-level `tools`/`documents` none refuses iteration the way Python's `None`
//!   does (and is not `== none`, though it `is none`); other nones iterate as empty.
//!
//! # Fallback
//!
//! A model without any chat template gets [`ChatTemplate::fallback`], plain ChatML:
//!
//! ```text
//! <|im_start|>{role}\n{content}<|im_end|>\n      (for every message)
//! <|im_start|>assistant\n                          (if add_generation_prompt)
//! ```
//!
//! `content` is the message's string, or the concatenated `text` parts of a list content;
//! tools, tool calls and reasoning are not rendered, and no bos/eos strings are added.
//! ChatML is the most widely trained format (Qwen, Yi, Hermes, many fine-tunes), so it is
//! the least wrong guess; a model trained on another format needs its real template.
//!
//! # Example
//!
//! ```
//! use kt_chat_template::{ChatRequest, ChatTemplate};
//! use serde_json::json;
//!
//! let t = ChatTemplate::fallback();
//! let req = ChatRequest {
//!     messages: vec![json!({"role": "user", "content": "Hi"})],
//!     add_generation_prompt: true,
//!     ..Default::default()
//! };
//! assert_eq!(t.render(&req)?, "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n");
//! # Ok::<(), kt_chat_template::TemplateError>(())
//! ```

mod env;
mod error;
mod load;
pub mod python;
mod template;

pub use env::{system_clock, Clock};
pub use error::TemplateError;
pub use load::{GGUF_CHAT_TEMPLATE, GGUF_CHAT_TEMPLATE_TOOL_USE};
pub use template::{ChatRequest, ChatTemplate, FALLBACK_TEMPLATE};
