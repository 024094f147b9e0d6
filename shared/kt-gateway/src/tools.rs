//! Tool calls parsed from the model's output, for chat templates that define tool calling.
//!
//! The format is chosen from the chat template's source:
//! * [`ToolFormat::Hermes`] — `<tool_call>\n{"name": .., "arguments": {..}}\n</tool_call>`,
//!   one block per call (Qwen2.5/Qwen3, Hermes, many fine-tunes);
//! * [`ToolFormat::Mistral`] — `[TOOL_CALLS][{"name": .., "arguments": {..}}, ..]`;
//! * [`ToolFormat::Llama3`] — the reply is a JSON object `{"name": .., "parameters": {..}}`
//!   (optionally after `<|python_tag|>`), Llama 3.1+ JSON tool calling.
//!
//! Templates in other formats (DeepSeek's `<｜tool▁calls▁begin｜>`, gpt-oss harmony, ...) are
//! served without tool-call parsing: the model's text comes back as content.
//!
//! Text before the first call is the message's `content`; a block that does not parse as a
//! call is left in the content as text, so nothing the model wrote is lost.

use serde_json::Value;

/// How a template's model writes tool calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToolFormat {
    Hermes,
    Mistral,
    Llama3,
}

/// One parsed call; `arguments` is JSON text (OpenAI sends it as a string).
#[derive(Debug, Clone, PartialEq)]
pub struct ToolCall {
    pub name: String,
    pub arguments: String,
}

impl ToolFormat {
    /// The format a template's source describes, if any.
    pub fn detect(template: &str) -> Option<Self> {
        if template.contains("<tool_call>") {
            Some(ToolFormat::Hermes)
        } else if template.contains("[TOOL_CALLS]") {
            Some(ToolFormat::Mistral)
        } else if template.contains("<|python_tag|>")
            || (template.contains("<|start_header_id|>") && template.contains("\"parameters\""))
        {
            Some(ToolFormat::Llama3)
        } else {
            None
        }
    }

    /// Where tool calls start in `text`, if they have (used to hold back streamed text).
    pub fn start_of_calls(self, text: &str) -> Option<usize> {
        match self {
            ToolFormat::Hermes => text.find("<tool_call>"),
            ToolFormat::Mistral => text.find("[TOOL_CALLS]"),
            ToolFormat::Llama3 => {
                if let Some(i) = text.find("<|python_tag|>") {
                    return Some(i);
                }
                let t = text.trim_start();
                t.starts_with('{').then(|| text.len() - t.len())
            }
        }
    }

    /// The longest suffix of `text` that could be the start of a call marker (held back while
    /// streaming so a marker split across tokens is not emitted as content).
    pub fn partial_marker_len(self, text: &str) -> usize {
        let marker = match self {
            ToolFormat::Hermes => "<tool_call>",
            ToolFormat::Mistral => "[TOOL_CALLS]",
            ToolFormat::Llama3 => "<|python_tag|>",
        };
        (1..marker.len().min(text.len() + 1))
            .rev()
            .find(|&n| {
                text.is_char_boundary(text.len() - n) && marker.starts_with(&text[text.len() - n..])
            })
            .unwrap_or(0)
    }

    /// Splits a finished reply into content and calls.
    pub fn parse(self, text: &str) -> (String, Vec<ToolCall>) {
        let Some(start) = self.start_of_calls(text) else {
            return (text.to_owned(), Vec::new());
        };
        let mut content = text[..start].to_owned();
        let rest = &text[start..];
        let mut calls = Vec::new();
        match self {
            ToolFormat::Hermes => {
                let mut rest = rest;
                while let Some(open) = rest.find("<tool_call>") {
                    content.push_str(rest[..open].trim_end_matches(char::is_whitespace));
                    let body = &rest[open + "<tool_call>".len()..];
                    let (inner, after) = match body.find("</tool_call>") {
                        Some(close) => (&body[..close], &body[close + "</tool_call>".len()..]),
                        None => (body, ""),
                    };
                    match call_of(inner.trim(), "arguments") {
                        Some(c) => calls.push(c),
                        None => content.push_str(&rest[open..rest.len() - after.len()]),
                    }
                    rest = after;
                }
                content.push_str(rest.trim());
            }
            ToolFormat::Mistral => {
                let body = rest["[TOOL_CALLS]".len()..].trim();
                match serde_json::from_str::<Value>(body) {
                    Ok(Value::Array(items)) => {
                        for item in items {
                            match call_of_value(&item, "arguments") {
                                Some(c) => calls.push(c),
                                None => content.push_str(&item.to_string()),
                            }
                        }
                    }
                    _ => content.push_str(rest),
                }
            }
            ToolFormat::Llama3 => {
                let body = rest.trim_start().strip_prefix("<|python_tag|>").unwrap_or(rest).trim();
                let parsed = call_of(body, "parameters").or_else(|| call_of(body, "arguments"));
                match parsed {
                    Some(c) => calls.push(c),
                    None => content.push_str(rest),
                }
            }
        }
        (content.trim().to_owned(), calls)
    }
}

fn call_of(text: &str, args_key: &str) -> Option<ToolCall> {
    call_of_value(&serde_json::from_str::<Value>(text).ok()?, args_key)
}

fn call_of_value(v: &Value, args_key: &str) -> Option<ToolCall> {
    let name = v.get("name")?.as_str()?.to_owned();
    let arguments = match v.get(args_key) {
        Some(Value::String(s)) => s.clone(),
        Some(a) => a.to_string(),
        None => "{}".to_owned(),
    };
    Some(ToolCall { name, arguments })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hermes_calls_and_content() {
        let f = ToolFormat::Hermes;
        let text = "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"t\", \"arguments\": {}}\n</tool_call>";
        let (content, calls) = f.parse(text);
        assert_eq!(content, "Let me check.");
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[0].name, "get_weather");
        assert_eq!(calls[0].arguments, r#"{"city":"Paris"}"#);
        let (content, calls) = f.parse("<tool_call>not json</tool_call>");
        assert!(calls.is_empty());
        assert!(content.contains("not json"));
        assert_eq!(f.partial_marker_len("abc <tool_"), 6);
        assert_eq!(f.partial_marker_len("abc"), 0);
    }

    #[test]
    fn mistral_and_llama3() {
        let (c, calls) =
            ToolFormat::Mistral.parse("[TOOL_CALLS][{\"name\": \"a\", \"arguments\": {\"x\": 1}}]");
        assert_eq!(c, "");
        assert_eq!(calls, vec![ToolCall { name: "a".into(), arguments: r#"{"x":1}"#.into() }]);
        let (_, calls) = ToolFormat::Llama3.parse("{\"name\": \"b\", \"parameters\": {\"y\": 2}}");
        assert_eq!(calls[0].name, "b");
        assert_eq!(ToolFormat::Llama3.parse("plain answer").1, vec![]);
        assert_eq!(ToolFormat::detect("{{ '<tool_call>' }}"), Some(ToolFormat::Hermes));
        assert_eq!(ToolFormat::detect("{{ messages }}"), None);
    }
}
