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
