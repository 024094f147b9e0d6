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
//!
//! While a reply streams, [`ToolFormat::scan`] reads the calls as far as they go (a name once
//! its string is complete, the arguments as they grow) so that the API layer can send them as
//! they come; [`ToolFormat::parse`] decides on the finished reply. [`ToolFormat::prefill`] is
//! the start of a call that `tool_choice: "required"` or a named function puts at the start
//! of the assistant's turn.

use serde_json::Value;

/// How a template's model writes tool calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToolFormat {
    Hermes,
    Mistral,
    Llama3,
}

/// What `tool_choice` asks of a reply.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum ToolChoice {
    /// The model decides (`auto`, or `tool_choice` not given).
    #[default]
    Auto,
    /// At least one call of any tool (`required`).
    Required,
    /// One call of this function (`{"type": "function", "function": {"name": ..}}`).
    Named(String),
}

impl ToolChoice {
    /// Whether the reply must be a call.
    pub fn forces(&self) -> bool {
        !matches!(self, ToolChoice::Auto)
    }

    /// The function a named choice asks for.
    pub fn name(&self) -> Option<&str> {
        match self {
            ToolChoice::Named(n) => Some(n),
            _ => None,
        }
    }
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

    /// The text that opens the assistant's turn when a call is required: the call marker, and
    /// with `name` also the call's name up to its arguments (the model writes the arguments).
    pub fn prefill(self, name: Option<&str>) -> String {
        let named = |args_key: &str| {
            name.map(|n| {
                let n = serde_json::to_string(n).unwrap_or_else(|_| "\"\"".into());
                format!("{{\"name\": {n}, \"{args_key}\":")
            })
        };
        match self {
            ToolFormat::Hermes => {
                format!("<tool_call>\n{}", named("arguments").unwrap_or_default())
            }
            ToolFormat::Mistral => match named("arguments") {
                Some(open) => format!("[TOOL_CALLS][{open}"),
                None => "[TOOL_CALLS]".into(),
            },
            ToolFormat::Llama3 => named("parameters").unwrap_or_else(|| "{\"name\": \"".into()),
        }
    }

    /// The calls in `text` (which starts where calls start, see [`Self::start_of_calls`]) as far
    /// as they have been written: every call with a complete name, and last maybe one still
    /// without. Objects that closed without a name are left out (they are not calls).
    pub fn scan(self, text: &str) -> Vec<PartialCall> {
        let mut out = Vec::new();
        let mut push = |o: ObjScan| {
            let closed = o.end.is_some();
            if o.call.name.is_some() || !closed {
                out.push(o.call);
            }
            o.end
        };
        match self {
            ToolFormat::Hermes => {
                let mut pos = 0;
                while let Some(open) = text[pos..].find("<tool_call>") {
                    let body = pos + open + "<tool_call>".len();
                    match push(scan_object(&text[body..], &["arguments"])) {
                        Some(end) => pos = body + end,
                        None => break,
                    }
                }
            }
            ToolFormat::Mistral => {
                let Some(rest) = text.trim_start().strip_prefix("[TOOL_CALLS]") else {
                    return out;
                };
                let Some(mut rest) = rest.trim_start().strip_prefix('[') else { return out };
                loop {
                    rest = rest.trim_start();
                    if !rest.starts_with('{') {
                        break;
                    }
                    match push(scan_object(rest, &["arguments"])) {
                        Some(end) => match rest[end..].trim_start().strip_prefix(',') {
                            Some(r) => rest = r,
                            None => break,
                        },
                        None => break,
                    }
                }
            }
            ToolFormat::Llama3 => {
                let t = text.trim_start();
                let t = t.strip_prefix("<|python_tag|>").unwrap_or(t).trim_start();
                if t.starts_with('{') {
                    push(scan_object(t, &["parameters", "arguments"]));
                }
            }
        }
        out
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

/// A call as far as a streaming reply shows it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PartialCall {
    /// The function's name, once its string is complete.
    pub name: Option<String>,
    /// The arguments' JSON text so far, without the white space outside strings (the form
    /// [`ToolFormat::parse`] gives). Arguments the model writes as a JSON string appear once
    /// that string is complete.
    pub arguments: String,
    /// Whether the call's object is closed.
    pub closed: bool,
}

struct ObjScan {
    call: PartialCall,
    /// Byte just after the closing `}`, once there.
    end: Option<usize>,
}

/// Walks one JSON object (after optional white space) as far as `s` goes, picking out the
/// top-level `name` string and the value of the first of `arg_keys`. Not a validator: the
/// finished reply is parsed with serde_json.
fn scan_object(s: &str, arg_keys: &[&str]) -> ObjScan {
    let b = s.as_bytes();
    let mut call = PartialCall::default();
    let start = s.len() - s.trim_start().len();
    if b.get(start) != Some(&b'{') {
        // Not an object: nothing to stream; the final parse keeps it as text.
        return ObjScan { call, end: (start < b.len()).then_some(start) };
    }
    let mut depth = 0usize;
    let mut in_str = false;
    let mut esc = false;
    // At depth 1: the current key's span, whether a key is expected next, and where the
    // current value started.
    let mut expect_key = true;
    let mut key: Option<(usize, usize)> = None;
    let mut str_start = 0;
    let mut value: Option<usize> = None;
    let mut is_args = false;
    let mut args_str = false;
    let mut after_colon = false;
    // Bytes of the arguments (white space outside strings left out, which keeps UTF-8 whole).
    let mut args: Vec<u8> = Vec::new();
    let key_is = |k: Option<(usize, usize)>, names: &[&str]| {
        k.is_some_and(|(a, z)| names.iter().any(|n| s.get(a..z) == Some(n)))
    };
    for (i, &c) in b.iter().enumerate().skip(start) {
        if in_str {
            if is_args && depth >= 2 {
                args.push(c);
            }
            if esc {
                esc = false;
            } else if c == b'\\' {
                esc = true;
            } else if c == b'"' {
                in_str = false;
                if depth == 1 {
                    if expect_key {
                        key = Some((str_start + 1, i));
                        expect_key = false;
                    } else if let Some(v) = value {
                        // A string value at the top level ends here.
                        let text = &s[v..=i];
                        if key_is(key, &["name"]) {
                            call.name = serde_json::from_str::<String>(text).ok();
                        } else if is_args && args_str {
                            args = serde_json::from_str::<String>(text)
                                .unwrap_or_default()
                                .into_bytes();
                        }
                        value = None;
                        is_args = false;
                    }
                }
            }
            continue;
        }
        match c {
            b' ' | b'\t' | b'\n' | b'\r' => continue,
            _ => {}
        }
        if depth == 1 && after_colon {
            after_colon = false;
            value = Some(i);
            is_args = key_is(key, arg_keys) && args.is_empty();
            args_str = c == b'"';
        }
        if is_args && depth >= 1 && !args_str && !(depth == 1 && matches!(c, b',' | b'}')) {
            args.push(c);
        }
        match c {
            b'"' => {
                in_str = true;
                str_start = i;
            }
            b'{' | b'[' => depth += 1,
            b'}' | b']' => {
                depth = depth.saturating_sub(1);
                if depth == 1 && is_args {
                    is_args = false;
                    value = None;
                }
                if depth == 0 {
                    call.closed = true;
                    call.arguments = String::from_utf8_lossy(&args).into_owned();
                    return ObjScan { call, end: Some(i + 1) };
                }
            }
            b':' if depth == 1 => after_colon = true,
            b',' if depth == 1 => {
                expect_key = true;
                value = None;
                is_args = false;
            }
            _ => {}
        }
    }
    call.arguments = String::from_utf8_lossy(&args).into_owned();
    ObjScan { call, end: None }
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

    #[test]
    fn scan_grows_with_the_text_and_ends_as_parse() {
        let cases = [
            (
                ToolFormat::Hermes,
                "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Zürich \\\"x\\\" {\", \"n\": [1, 2]}}\n</tool_call>\n<tool_call>\n{\"arguments\": {}, \"name\": \"t\"}\n</tool_call>",
            ),
            (
                ToolFormat::Mistral,
                "[TOOL_CALLS][{\"name\": \"a\", \"arguments\": {\"x\": 1}}, {\"name\": \"b\", \"arguments\": \"{\\\"y\\\": 2}\"}]",
            ),
            (ToolFormat::Llama3, "<|python_tag|>{\"name\": \"b\", \"parameters\": {\"y\": 2.5}}"),
        ];
        for (fmt, text) in cases {
            let (_, calls) = fmt.parse(text);
            assert!(!calls.is_empty(), "{text}");
            let mut prev: Vec<PartialCall> = Vec::new();
            for end in (0..=text.len()).filter(|&e| text.is_char_boundary(e)) {
                let now = fmt.scan(&text[..end]);
                for (k, p) in prev.iter().enumerate().filter(|(_, p)| p.name.is_some()) {
                    assert_eq!(now[k].name, p.name, "{fmt:?} at {end}");
                    assert!(
                        now[k].arguments.starts_with(&p.arguments),
                        "{fmt:?} at {end}: {now:?}"
                    );
                }
                prev = now;
            }
            let got: Vec<ToolCall> = prev
                .iter()
                .map(|p| ToolCall { name: p.name.clone().unwrap(), arguments: p.arguments.clone() })
                .collect();
            assert_eq!(got, calls, "{fmt:?}");
            assert!(prev.iter().all(|p| p.closed));
        }
        // A block without a name is no call; the calls after it still count.
        let calls =
            ToolFormat::Hermes.scan("<tool_call>{\"x\": 1}</tool_call><tool_call>{\"name\": \"n\"");
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0].name.as_deref(), Some("n"));
        assert!(!calls[0].closed);
    }

    #[test]
    fn prefills_open_a_call_that_parses() {
        for fmt in [ToolFormat::Hermes, ToolFormat::Mistral, ToolFormat::Llama3] {
            let named = fmt.prefill(Some("get \"w\""));
            let close = if fmt == ToolFormat::Mistral { " {\"c\": 1}}]" } else { " {\"c\": 1}}" };
            let (content, calls) = fmt.parse(&format!("{named}{close}"));
            assert_eq!(content, "", "{fmt:?}");
            assert_eq!(
                calls,
                vec![ToolCall { name: "get \"w\"".into(), arguments: r#"{"c":1}"#.into() }]
            );
            let any = fmt.prefill(None);
            assert_eq!(fmt.start_of_calls(&any), Some(0), "{fmt:?}");
        }
    }
}
