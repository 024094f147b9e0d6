//! An incremental JSON syntax checker for `response_format: json_object` and Ollama's
//! `format: "json"`.
//!
//! The gateway does not sample (the worker does, and `kt.v1.Worker` has no grammar field), so
//! it cannot stop the model from choosing a token that breaks JSON. What it does, exactly:
//! text is fed to this checker as it streams; leading white space is allowed; the first value
//! must be an object; the text is emitted up to the byte that closes that object, and
//! generation is stopped there (finish reason `stop`). A character that cannot continue a JSON
//! object ends the generation with an error naming the byte offset. Text cut off by the token
//! budget is returned as is with finish reason `length` (as OpenAI does).

/// What the checker says about the text fed so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JsonState {
    /// Valid so far, not finished.
    Partial,
    /// The top-level object closed after this many bytes of the last piece.
    Complete(usize),
    /// The byte at this offset of the whole text cannot continue JSON.
    Invalid(usize),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ctx {
    /// After `{`: a key or `}`.
    ObjKeyOrEnd,
    /// After `,` in an object: a key.
    ObjKey,
    /// After a key: `:`.
    ObjColon,
    /// After `:`: a value.
    ObjValue,
    /// After a member: `,` or `}`.
    ObjCommaOrEnd,
    /// After `[`: a value or `]`.
    ArrValueOrEnd,
    /// After `,` in an array: a value.
    ArrValue,
    /// After an element: `,` or `]`.
    ArrCommaOrEnd,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lex {
    /// Between tokens.
    Idle,
    /// Inside a string; `key` tells whether it is an object key.
    Str { key: bool, escape: bool, hex: u8 },
    /// Inside a number or a literal (`true`, `false`, `null`).
    Word,
}

/// The checker. Feed it text with [`JsonChecker::push`].
#[derive(Debug, Clone)]
pub struct JsonChecker {
    stack: Vec<Ctx>,
    lex: Lex,
    word: String,
    started: bool,
    done: bool,
    offset: usize,
}

impl Default for JsonChecker {
    fn default() -> Self {
        Self::new()
    }
}

/// Deepest nesting accepted.
const MAX_DEPTH: usize = 256;

impl JsonChecker {
    pub fn new() -> Self {
        Self {
            stack: Vec::new(),
            lex: Lex::Idle,
            word: String::new(),
            started: false,
            done: false,
            offset: 0,
        }
    }

    /// Whether the top-level object has closed.
    pub fn is_complete(&self) -> bool {
        self.done
    }

    /// Feeds `piece`; see [`JsonState`].
    pub fn push(&mut self, piece: &str) -> JsonState {
        if self.done {
            return JsonState::Complete(0);
        }
        for (i, c) in piece.char_indices() {
            if !self.step(c) {
                return JsonState::Invalid(self.offset + i);
            }
            if self.done {
                self.offset += i + c.len_utf8();
                return JsonState::Complete(i + c.len_utf8());
            }
        }
        self.offset += piece.len();
        JsonState::Partial
    }

    fn word_ok(w: &str) -> bool {
        ["true", "false", "null"].iter().any(|l| l.starts_with(w))
            || w.chars().all(|c| c.is_ascii_digit() || "+-.eE".contains(c))
    }

    fn word_complete(w: &str) -> bool {
        matches!(w, "true" | "false" | "null")
            || (!w.starts_with('+') && !w.ends_with('.') && w.parse::<f64>().is_ok())
    }

    /// A value just ended: move the enclosing context on.
    fn value_done(&mut self) {
        match self.stack.last_mut() {
            Some(c @ Ctx::ObjValue) => *c = Ctx::ObjCommaOrEnd,
            Some(c @ (Ctx::ArrValue | Ctx::ArrValueOrEnd)) => *c = Ctx::ArrCommaOrEnd,
            None => self.done = true,
            _ => {}
        }
    }

    fn set_top(&mut self, ctx: Ctx) {
        if let Some(top) = self.stack.last_mut() {
            *top = ctx;
        }
    }

    fn step(&mut self, c: char) -> bool {
        match self.lex {
            Lex::Str { key, escape, hex } => {
                if hex > 0 {
                    if !c.is_ascii_hexdigit() {
                        return false;
                    }
                    self.lex = Lex::Str { key, escape: false, hex: hex - 1 };
                } else if escape {
                    match c {
                        'u' => self.lex = Lex::Str { key, escape: false, hex: 4 },
                        '"' | '\\' | '/' | 'b' | 'f' | 'n' | 'r' | 't' => {
                            self.lex = Lex::Str { key, escape: false, hex: 0 }
                        }
                        _ => return false,
                    }
                } else if c == '\\' {
                    self.lex = Lex::Str { key, escape: true, hex: 0 };
                } else if c == '"' {
                    self.lex = Lex::Idle;
                    if key {
                        self.set_top(Ctx::ObjColon);
                    } else {
                        self.value_done();
                    }
                } else if (c as u32) < 0x20 {
                    return false;
                }
                true
            }
            Lex::Word => {
                if c.is_ascii_alphanumeric() || "+-.".contains(c) {
                    self.word.push(c);
                    return Self::word_ok(&self.word);
                }
                if !Self::word_complete(&self.word) {
                    return false;
                }
                self.word.clear();
                self.lex = Lex::Idle;
                self.value_done();
                self.step(c)
            }
            Lex::Idle => {
                if c.is_whitespace() {
                    return true;
                }
                if !self.started {
                    if c != '{' {
                        return false;
                    }
                    self.started = true;
                    self.stack.push(Ctx::ObjKeyOrEnd);
                    return true;
                }
                let Some(top) = self.stack.last().copied() else {
                    return false;
                };
                match (top, c) {
                    (Ctx::ObjKeyOrEnd | Ctx::ObjCommaOrEnd, '}')
                    | (Ctx::ArrValueOrEnd | Ctx::ArrCommaOrEnd, ']') => {
                        self.stack.pop();
                        self.value_done();
                        true
                    }
                    (Ctx::ObjKeyOrEnd | Ctx::ObjKey, '"') => {
                        self.lex = Lex::Str { key: true, escape: false, hex: 0 };
                        true
                    }
                    (Ctx::ObjColon, ':') => {
                        self.set_top(Ctx::ObjValue);
                        true
                    }
                    (Ctx::ObjCommaOrEnd, ',') => {
                        self.set_top(Ctx::ObjKey);
                        true
                    }
                    (Ctx::ArrCommaOrEnd, ',') => {
                        self.set_top(Ctx::ArrValue);
                        true
                    }
                    (Ctx::ObjValue | Ctx::ArrValue | Ctx::ArrValueOrEnd, c) => self.start_value(c),
                    _ => false,
                }
            }
        }
    }

    fn start_value(&mut self, c: char) -> bool {
        match c {
            '{' | '[' if self.stack.len() >= MAX_DEPTH => false,
            '{' => {
                self.stack.push(Ctx::ObjKeyOrEnd);
                true
            }
            '[' => {
                self.stack.push(Ctx::ArrValueOrEnd);
                true
            }
            '"' => {
                self.lex = Lex::Str { key: false, escape: false, hex: 0 };
                true
            }
            c if c == '-' || c.is_ascii_digit() || "tfn".contains(c) => {
                self.lex = Lex::Word;
                self.word.clear();
                self.word.push(c);
                true
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_all_splits(text: &str) -> JsonState {
        let mut whole = JsonChecker::new();
        let want = whole.push(text);
        for cut in 1..text.len() {
            if !text.is_char_boundary(cut) {
                continue;
            }
            let mut c = JsonChecker::new();
            let got = match c.push(&text[..cut]) {
                JsonState::Partial => match c.push(&text[cut..]) {
                    JsonState::Complete(n) => JsonState::Complete(cut + n),
                    other => other,
                },
                other => other,
            };
            assert_eq!(got, want, "{text:?} cut at {cut}");
        }
        want
    }

    #[test]
    fn accepts_objects_and_stops_at_the_end() {
        let doc = r#" {"a": [1, -2.5e3, true, null, "x\"\u00e9"], "b": {"c": {}}, "d": []}"#;
        assert_eq!(check_all_splits(doc), JsonState::Complete(doc.len()));
        let with_tail = format!("{doc} trailing");
        assert_eq!(check_all_splits(&with_tail), JsonState::Complete(doc.len()));
        assert_eq!(check_all_splits(r#"{"a": 1"#), JsonState::Partial);
        assert_eq!(check_all_splits(r#"{"n":10}"#), JsonState::Complete(8));
    }

    #[test]
    fn rejects_what_cannot_continue() {
        assert_eq!(JsonChecker::new().push("hello"), JsonState::Invalid(0));
        assert_eq!(JsonChecker::new().push("[1]"), JsonState::Invalid(0));
        assert_eq!(JsonChecker::new().push(r#"{"a" 1}"#), JsonState::Invalid(5));
        assert_eq!(JsonChecker::new().push(r#"{"a": tru }"#), JsonState::Invalid(9));
        assert_eq!(JsonChecker::new().push(r#"{"a": 1,}"#), JsonState::Invalid(8));
        assert_eq!(JsonChecker::new().push(r#"{"a": [1,]}"#), JsonState::Invalid(9));
        assert_eq!(JsonChecker::new().push("{\"a\n\": 1}"), JsonState::Invalid(3));
        assert!(matches!(JsonChecker::new().push(r#"{"a": 1.}"#), JsonState::Invalid(_)));
    }
}
