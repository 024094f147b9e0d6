//! [`ChatTemplate`]: a compiled chat template and how a [`ChatRequest`] is turned into the
//! model's prompt text.

use std::fmt;
use std::sync::{Arc, RwLock};

use minijinja::value::Serde;
use minijinja::{Environment, Value};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value as Json};

use crate::env::{self, Clock, PyNone, RaisedException};
use crate::TemplateError;

/// The ChatML template used for models that ship none (see the crate docs).
pub const FALLBACK_TEMPLATE: &str = concat!(
    "{%- for message in messages -%}",
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}",
    "{%- if message['content'] is string -%}",
    "{{- message['content'] -}}",
    "{%- elif message['content'] is iterable -%}",
    "{%- for part in message['content'] -%}",
    "{%- if part is mapping and part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}",
    "{%- endfor -%}",
    "{%- endif -%}",
    "{{- '<|im_end|>\\n' -}}",
    "{%- endfor -%}",
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}",
);

/// What a chat template is rendered with: the names transformers' `apply_chat_template`
/// passes to the template.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ChatRequest {
    /// OpenAI-style messages: JSON objects with `role`, `content` and optionally
    /// `tool_calls`, `tool_call_id`, `name`, `reasoning_content`. Keys whose value is `null`
    /// are dropped before rendering (as `apply_chat_template` does), and reasoning given
    /// under `reasoning_content`, `thinking` or `reasoning` is also visible under
    /// `reasoning_content` and `thinking` (as transformers does).
    pub messages: Vec<Json>,
    /// Tool (function) schemas, visible to the template as `tools`; without them `tools` is
    /// Python's `None` (falsy, `is none`, not iterable). When the template source has a `tool_use` variant, it is used whenever
    /// tools are given.
    #[serde(default)]
    pub tools: Option<Vec<Json>>,
    /// End the prompt with the opening of an assistant turn.
    #[serde(default)]
    pub add_generation_prompt: bool,
    /// Further template variables (`enable_thinking`, `reasoning_effort`, ...). They may
    /// override `bos_token`/`eos_token`, but not `messages`, `tools`, `documents` or
    /// `add_generation_prompt`.
    #[serde(default)]
    pub extra: Map<String, Json>,
}

/// A compiled chat template with the bos/eos strings it is rendered with.
pub struct ChatTemplate {
    env: Environment<'static>,
    has_tool_use: bool,
    bos_token: Option<String>,
    eos_token: Option<String>,
    clock: Arc<RwLock<Clock>>,
}

impl fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("has_tool_use", &self.has_tool_use)
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .finish_non_exhaustive()
    }
}

const DEFAULT: &str = "default";
const TOOL_USE: &str = "tool_use";

impl ChatTemplate {
    /// Compiles `source`. `bos_token`/`eos_token` are the tokenizer's special-token strings;
    /// `None` leaves the variable undefined (it renders as the empty string).
    pub fn new(
        source: &str,
        bos_token: Option<String>,
        eos_token: Option<String>,
    ) -> Result<Self, TemplateError> {
        Self::with_variants(source, None, bos_token, eos_token)
    }

    /// Compiles a default template and an optional `tool_use` variant, used when a request
    /// has tools (the named templates of a Hugging Face tokenizer config).
    pub fn with_variants(
        default: &str,
        tool_use: Option<&str>,
        bos_token: Option<String>,
        eos_token: Option<String>,
    ) -> Result<Self, TemplateError> {
        let clock = Arc::new(RwLock::new(env::system_clock()));
        let clock_for_env = Arc::clone(&clock);
        let now: Clock = Arc::new(move || {
            let guard = clock_for_env.read().unwrap_or_else(|poisoned| poisoned.into_inner());
            (*guard)()
        });
        let mut env = env::build(now).map_err(|e| TemplateError::Syntax(error_text(&e)))?;
        env.add_template_owned(DEFAULT, rewrite_generation_tags(default))
            .map_err(|e| TemplateError::Syntax(error_text(&e)))?;
        if let Some(tool_use) = tool_use {
            env.add_template_owned(TOOL_USE, rewrite_generation_tags(tool_use))
                .map_err(|e| TemplateError::Syntax(error_text(&e)))?;
        }
        Ok(Self { env, has_tool_use: tool_use.is_some(), bos_token, eos_token, clock })
    }

    /// The documented ChatML fallback ([`FALLBACK_TEMPLATE`]) for models without a template.
    pub fn fallback() -> Self {
        match Self::new(FALLBACK_TEMPLATE, None, None) {
            Ok(t) => t,
            // The fallback is a constant that the unit tests compile.
            Err(e) => unreachable!("fallback chat template does not compile: {e}"),
        }
    }

    /// Replaces the clock `strftime_now` reads (tests use a fixed time).
    pub fn with_clock(self, clock: Clock) -> Self {
        match self.clock.write() {
            Ok(mut guard) => *guard = clock,
            Err(poisoned) => *poisoned.into_inner() = clock,
        }
        self
    }

    pub fn bos_token(&self) -> Option<&str> {
        self.bos_token.as_deref()
    }

    pub fn eos_token(&self) -> Option<&str> {
        self.eos_token.as_deref()
    }

    /// Whether a separate `tool_use` template is used for requests with tools.
    pub fn has_tool_use_variant(&self) -> bool {
        self.has_tool_use
    }

    /// Renders the prompt for `req`.
    pub fn render(&self, req: &ChatRequest) -> Result<String, TemplateError> {
        let name = if req.tools.is_some() && self.has_tool_use { TOOL_USE } else { DEFAULT };
        let mut messages = Vec::with_capacity(req.messages.len());
        for (i, m) in req.messages.iter().enumerate() {
            messages.push(normalize_message(i, m)?);
        }
        let mut ctx: Vec<(String, Value)> = Vec::with_capacity(req.extra.len() + 6);
        let mut set = |name: &str, value: Value| match ctx.iter_mut().find(|(k, _)| k == name) {
            Some(slot) => slot.1 = value,
            None => ctx.push((name.to_owned(), value)),
        };
        if let Some(bos) = &self.bos_token {
            set("bos_token", Value::from(bos.as_str()));
        }
        if let Some(eos) = &self.eos_token {
            set("eos_token", Value::from(eos.as_str()));
        }
        for (k, v) in &req.extra {
            set(k, Value::from(Serde(v)));
        }
        set("messages", Value::from(Serde(&messages)));
        set(
            "tools",
            req.tools
                .as_ref()
                .map_or_else(|| Value::from_object(PyNone), |t| Value::from(Serde(t))),
        );
        set("documents", Value::from_object(PyNone));
        set("add_generation_prompt", Value::from(req.add_generation_prompt));

        let template =
            self.env.get_template(name).map_err(|e| TemplateError::Render(error_text(&e)))?;
        template.render(Value::from_pairs(ctx)).map_err(render_error)
    }
}

/// A message as transformers hands it to the template: `null` fields dropped, reasoning
/// aliased under `thinking` (first) and `reasoning_content` (last) unless already present.
fn normalize_message(index: usize, message: &Json) -> Result<Json, TemplateError> {
    let Json::Object(obj) = message else {
        return Err(TemplateError::InvalidRequest(format!("message {index} is not a JSON object")));
    };
    let obj: Map<String, Json> =
        obj.iter().filter(|(_, v)| !v.is_null()).map(|(k, v)| (k.clone(), v.clone())).collect();
    let reasoning =
        ["reasoning_content", "thinking", "reasoning"].iter().find_map(|k| obj.get(*k)).cloned();
    let Some(reasoning) = reasoning else {
        return Ok(Json::Object(obj));
    };
    let mut out = Map::new();
    out.insert("thinking".into(), reasoning.clone());
    for (k, v) in obj {
        out.insert(k, v);
    }
    out.insert("reasoning_content".into(), reasoning);
    Ok(Json::Object(out))
}

/// The error's text with its causes (minijinja puts the template line in the first).
fn error_text(err: &minijinja::Error) -> String {
    let mut text = err.to_string();
    let mut source = std::error::Error::source(err);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

fn render_error(err: minijinja::Error) -> TemplateError {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&err);
    while let Some(s) = source {
        if let Some(raised) = s.downcast_ref::<RaisedException>() {
            return TemplateError::Raised(raised.0.clone());
        }
        source = s.source();
    }
    TemplateError::Render(error_text(&err))
}

/// transformers' `{% generation %}...{% endgeneration %}` marks assistant text for its
/// training masks and renders the body unchanged. minijinja has no such tag, so the pair
/// becomes `{% if true %}...{% endif %}`, keeping the whitespace-control markers.
pub(crate) fn rewrite_generation_tags(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(start) = rest.find("{%") {
        out.push_str(&rest[..start]);
        let tag = &rest[start..];
        match parse_generation_tag(tag) {
            Some((len, replacement)) => {
                out.push_str(&replacement);
                rest = &tag[len..];
            }
            None => {
                out.push_str("{%");
                rest = &tag[2..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// If `tag` starts with `{%[-+] (end)generation [-+]%}`, its length and rewrite.
fn parse_generation_tag(tag: &str) -> Option<(usize, String)> {
    let body = tag.strip_prefix("{%")?;
    let (open_ws, body) = match body.chars().next() {
        Some(c @ ('-' | '+')) => (c.to_string(), &body[1..]),
        _ => (String::new(), body),
    };
    let body = body.trim_start();
    let (keyword, body) = if let Some(b) = body.strip_prefix("endgeneration") {
        ("endif", b)
    } else if let Some(b) = body.strip_prefix("generation") {
        ("if true", b)
    } else {
        return None;
    };
    if body.chars().next().is_some_and(|c| c.is_alphanumeric() || c == '_') {
        return None;
    }
    let body = body.trim_start();
    let (close_ws, body) = match body.chars().next() {
        Some(c @ ('-' | '+')) => (c.to_string(), &body[1..]),
        _ => (String::new(), body),
    };
    let after = body.strip_prefix("%}")?;
    let len = tag.len() - after.len();
    Some((len, format!("{{%{open_ws} {keyword} {close_ws}%}}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn req(messages: Vec<Json>, add_generation_prompt: bool) -> ChatRequest {
        ChatRequest { messages, add_generation_prompt, ..Default::default() }
    }

    #[test]
    fn shareable_across_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<ChatTemplate>();
    }

    #[test]
    fn generation_tags_become_if_blocks() {
        assert_eq!(
            rewrite_generation_tags(
                "a{%- generation -%}b{% endgeneration %}c{% if x %}{% endif %}"
            ),
            "a{%- if true -%}b{% endif %}c{% if x %}{% endif %}"
        );
        assert_eq!(rewrite_generation_tags("{% generations %}"), "{% generations %}");
    }

    #[test]
    fn fallback_is_chatml() {
        let t = ChatTemplate::fallback();
        let out = t
            .render(&req(
                vec![
                    json!({"role": "system", "content": "Be brief."}),
                    json!({"role": "user", "content": [{"type": "text", "text": "Hi"}]}),
                    json!({"role": "assistant", "content": null}),
                ],
                true,
            ))
            .unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n\
             <|im_start|>assistant\n<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn raise_exception_gives_the_message() {
        let t =
            ChatTemplate::new("{{ raise_exception('roles must alternate') }}", None, None).unwrap();
        match t.render(&req(vec![], false)) {
            Err(TemplateError::Raised(m)) => assert_eq!(m, "roles must alternate"),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn python_spelling_and_tokens() {
        let t = ChatTemplate::new(
            "{{ bos_token }}{{ messages[0].x }} {{ tools }} {{ messages[0] | tojson }}{{ eos_token }}",
            Some("<s>".into()),
            None,
        )
        .unwrap();
        let out = t.render(&req(vec![json!({"x": true, "b": "ü", "a": null})], false)).unwrap();
        assert_eq!(out, "<s>True None {\"x\": true, \"b\": \"ü\"}");
    }

    #[test]
    fn reasoning_is_aliased() {
        let m =
            normalize_message(0, &json!({"role": "assistant", "reasoning": "r", "content": "c"}))
                .unwrap();
        let keys: Vec<&str> = m.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(keys, ["thinking", "role", "reasoning", "content", "reasoning_content"]);
    }

    #[test]
    fn clock_is_injectable() {
        let t = ChatTemplate::new("{{ strftime_now('%d %b %Y') }}", None, None).unwrap();
        let t = t.with_clock(Arc::new(|| {
            chrono::NaiveDate::from_ymd_opt(2024, 2, 9)
                .and_then(|d| d.and_hms_opt(1, 2, 3))
                .unwrap_or_default()
        }));
        assert_eq!(t.render(&ChatRequest::default()).unwrap(), "09 Feb 2024");
    }

    #[test]
    fn tool_use_variant_is_picked_with_tools() {
        let t = ChatTemplate::with_variants("plain", Some("tools"), None, None).unwrap();
        assert_eq!(t.render(&ChatRequest::default()).unwrap(), "plain");
        let with_tools = ChatRequest { tools: Some(vec![]), ..Default::default() };
        assert_eq!(t.render(&with_tools).unwrap(), "tools");
    }
}
