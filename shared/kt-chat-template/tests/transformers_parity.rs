//! Every template in `tests/fixtures/chat-templates/templates/`, every conversation in
//! `cases.json`: kt's rendering must equal transformers' byte for byte (recorded by
//! `tests/fixtures/chat-templates/record.py`), and where transformers raised, kt must fail too.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers outside #[test] fns

use std::path::{Path, PathBuf};
use std::sync::Arc;

use kt_chat_template::{ChatRequest, ChatTemplate};
use serde_json::Value;

/// Cases where kt knowingly renders differently from transformers: (template, case, reason).
/// Each must still render, and still differ (a case that starts matching must leave the list).
const KNOWN_DIFFERENCES: &[(&str, &str, &str)] = &[
    ("meetkai-functionary-medium-v3.1.jinja", "tool_call", MARKUP_ADD),
    ("meetkai-functionary-medium-v3.1.jinja", "tool_call_typed", MARKUP_ADD),
];

const MARKUP_ADD: &str =
    "`\"...\"|safe + t[\"function\"] | tojson`: in jinja2 a Markup string plus a plain string \
     HTML-escapes the plain one (Markup.__add__), so transformers prints the tool JSON as \
     `{&#34;name&#34;: ...}`. minijinja escapes in such a concatenation only when \
     auto-escaping is on, which would also escape every `{{ }}`; kt prints the JSON as is.";

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/chat-templates")
}

fn read_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn request(case: &Value) -> ChatRequest {
    ChatRequest {
        messages: case["messages"].as_array().unwrap().clone(),
        tools: case["tools"].as_array().cloned(),
        add_generation_prompt: case["add_generation_prompt"].as_bool().unwrap(),
        extra: case["extra"].as_object().unwrap().clone(),
    }
}

/// The first differing line, for the failure report.
fn first_difference(want: &str, got: &str) -> String {
    let byte = want
        .bytes()
        .zip(got.bytes())
        .position(|(a, b)| a != b)
        .unwrap_or(want.len().min(got.len()));
    let start = byte.saturating_sub(60);
    let clip = |s: &str| -> String {
        let from = (start..=start.min(s.len())).rev().find(|i| s.is_char_boundary(*i)).unwrap_or(0);
        s[from..].chars().take(120).collect()
    };
    format!("at byte {byte}\n    want: {:?}\n    got:  {:?}", clip(want), clip(got))
}

#[test]
fn renders_like_transformers() {
    let dir = fixtures();
    let cases_doc = read_json(&dir.join("cases.json"));
    let now = chrono::NaiveDateTime::parse_from_str(
        cases_doc["now"].as_str().unwrap(),
        "%Y-%m-%dT%H:%M:%S",
    )
    .unwrap();
    let cases = cases_doc["cases"].as_object().unwrap();

    let mut expected: Vec<PathBuf> = std::fs::read_dir(dir.join("expected"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    expected.sort();
    assert!(expected.len() >= 60, "only {} expected files", expected.len());

    let (mut passed, mut total, mut known) = (0, 0, 0);
    let mut failures = Vec::new();
    for path in &expected {
        let doc = read_json(path);
        let name = doc["template"].as_str().unwrap();
        let source = std::fs::read_to_string(dir.join("templates").join(name)).unwrap();
        let bos = doc["bos_token"].as_str().map(str::to_owned);
        let eos = doc["eos_token"].as_str().map(str::to_owned);
        let template =
            ChatTemplate::new(&source, bos, eos).map(|t| t.with_clock(Arc::new(move || now)));
        for (case_name, outcome) in doc["cases"].as_object().unwrap() {
            total += 1;
            let got = match &template {
                Ok(t) => t.render(&request(&cases[case_name])),
                Err(e) => Err(kt_chat_template::TemplateError::Syntax(e.to_string())),
            };
            let verdict = match (outcome.get("output").and_then(Value::as_str), &got) {
                (Some(want), Ok(got)) if want == got => None,
                (Some(want), Ok(got)) => Some(first_difference(want, got)),
                (Some(_), Err(e)) => Some(format!("kt failed: {e}")),
                (None, Err(_)) => None,
                (None, Ok(_)) => {
                    Some(format!("transformers failed ({}), kt rendered", outcome["error"]))
                }
            };
            let known_reason = KNOWN_DIFFERENCES
                .iter()
                .find(|(t, c, _)| *t == name && c == case_name)
                .map(|k| k.2);
            match (verdict, known_reason) {
                (None, None) => passed += 1,
                (Some(why), None) => failures.push(format!("{name} / {case_name}: {why}")),
                (Some(_), Some(reason)) if got.is_ok() => {
                    known += 1;
                    println!("KNOWN {name} / {case_name}: {reason}");
                }
                (Some(why), Some(_)) => failures.push(format!("{name} / {case_name}: {why}")),
                (None, Some(_)) => failures.push(format!(
                    "{name} / {case_name}: matches now, drop it from KNOWN_DIFFERENCES"
                )),
            }
        }
    }
    println!(
        "{passed}/{total} template cases render like transformers ({} templates, {known} known differences)",
        expected.len()
    );
    for f in &failures {
        println!("FAIL {f}");
    }
    assert!(failures.is_empty(), "{} of {total} cases differ from transformers", failures.len());
}
