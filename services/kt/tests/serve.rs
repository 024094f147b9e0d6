//! `kt serve`: gateway + worker + experts in one process, on 127.0.0.1. A greedy completion
//! over HTTP gives the text `kt generate` gives for the same prompt, with the embedded model
//! and with a fixture model folder.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Serve {
    child: Child,
    addr: String,
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve(args: &[&str]) -> Serve {
    let mut child = Command::new(env!("CARGO_BIN_EXE_kt"))
        .arg("serve")
        .args(["--listen", "127.0.0.1:0", "--kv-memory", "0.01"])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let addr =
        line.trim().strip_prefix("listening on ").unwrap_or_else(|| panic!("{line:?}")).to_string();
    Serve { child, addr }
}

/// One HTTP/1.1 request; returns (status, body).
fn http(addr: &str, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (status, body)
}

/// Waits (bounded) until the gateway has seen its worker healthy.
fn ready(addr: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while http(addr, "GET", "/ready", "").0 != 200 {
        assert!(Instant::now() < deadline, "kt serve never became ready");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn generate_text(model: Option<&Path>, prompt: &str, n: usize) -> String {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kt"));
    cmd.arg("generate");
    if let Some(m) = model {
        cmd.arg("--model").arg(m);
    }
    let out =
        cmd.args(["--prompt", prompt, "--max-tokens", &n.to_string(), "--json"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["text"].as_str().unwrap().to_string()
}

fn completion(addr: &str, model: &str, prompt: &str, n: usize) -> serde_json::Value {
    let body = serde_json::json!({
        "model": model, "prompt": prompt, "max_tokens": n, "temperature": 0
    })
    .to_string();
    let (status, body) = http(addr, "POST", "/v1/completions", &body);
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

#[test]
fn serve_answers_like_generate() {
    let fixture =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models/qwen3moe/hf");
    for (model, name) in [(None, "qwen3moe-tiny"), (Some(fixture.as_path()), "hf")] {
        let args: Vec<String> = match model {
            Some(p) => vec!["--model".into(), p.display().to_string()],
            None => vec![],
        };
        let s = serve(&args.iter().map(String::as_str).collect::<Vec<_>>());
        ready(&s.addr);
        let (status, models) = http(&s.addr, "GET", "/v1/models", "");
        assert_eq!(status, 200);
        assert!(models.contains(name), "{models}");
        let prompt = "The quick brown fox";
        let v = completion(&s.addr, name, prompt, 12);
        let text = v["choices"][0]["text"].as_str().unwrap();
        assert_eq!(text, generate_text(model, prompt, 12), "{v}");
        assert!(v["usage"]["completion_tokens"].as_u64().unwrap() <= 12, "{v}");
    }
}

fn root() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// `kt serve` with the given args, expected to exit non-zero before listening; its stderr.
fn serve_fails(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_kt"))
        .arg("serve")
        .args(["--listen", "127.0.0.1:0", "--kv-memory", "0.01"])
        .args(args)
        .output()
        .unwrap();
    assert!(!out.status.success(), "kt serve started: {}", String::from_utf8_lossy(&out.stdout));
    assert!(out.stdout.is_empty(), "{}", String::from_utf8_lossy(&out.stdout));
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn serve_with_plan_answers() {
    let model = root().join("tests/fixtures/models/qwen2moe/hf");
    let plan = root().join("rules/fixtures/qwen2moe.yaml");
    let s = serve(&["--model", model.to_str().unwrap(), "--plan", plan.to_str().unwrap()]);
    ready(&s.addr);
    let v = completion(&s.addr, "hf", "The quick brown fox", 4);
    assert!(v["usage"]["completion_tokens"].as_u64().unwrap() >= 1, "{v}");
    drop(s);
    // decode amx_int8: the routed experts are repacked and every call runs on them.
    let text =
        std::fs::read_to_string(&plan).unwrap().replace("decode: native", "decode: amx_int8");
    let plan = std::env::temp_dir().join(format!("kt-serve-int8-{}.yaml", std::process::id()));
    std::fs::write(&plan, text).unwrap();
    let s = serve(&["--model", model.to_str().unwrap(), "--plan", plan.to_str().unwrap()]);
    let _ = std::fs::remove_file(&plan);
    ready(&s.addr);
    let v = completion(&s.addr, "hf", "The quick brown fox", 4);
    assert!(v["usage"]["completion_tokens"].as_u64().unwrap() >= 1, "{v}");
}

#[test]
fn serve_refuses_a_plan_for_another_arch() {
    let model = root().join("tests/fixtures/models/qwen2moe/hf");
    let plan = root().join("rules/fixtures/mixtral.yaml");
    let err = serve_fails(&["--model", model.to_str().unwrap(), "--plan", plan.to_str().unwrap()]);
    assert!(err.contains("mixtral.yaml"), "{err}");
    assert!(err.contains("the plan is for arch `mixtral`"), "{err}");
}

#[test]
fn serve_refuses_an_expert_format_it_does_not_compute() {
    let model = root().join("tests/fixtures/models/qwen2moe/hf");
    let text = std::fs::read_to_string(root().join("rules/fixtures/qwen2moe.yaml")).unwrap();
    let text = text.replace(
        "kernel: {decode: native, prefill: native}",
        "kernel: {decode: native, prefill: amx_bf16}",
    );
    assert!(text.contains("amx_bf16"));
    let plan = std::env::temp_dir().join(format!("kt-serve-plan-{}.yaml", std::process::id()));
    std::fs::write(&plan, text).unwrap();
    let err = serve_fails(&["--model", model.to_str().unwrap(), "--plan", plan.to_str().unwrap()]);
    let _ = std::fs::remove_file(&plan);
    assert!(err.contains(plan.to_str().unwrap()), "{err}");
    assert!(err.contains("`amx_bf16` is not implemented"), "{err}");
}

#[test]
fn serve_plan_needs_a_model() {
    let plan = root().join("rules/fixtures/qwen2moe.yaml");
    let err = serve_fails(&["--plan", plan.to_str().unwrap()]);
    assert!(err.contains("--model"), "{err}");
}
