//! `kt bench generate` on a fixture model: listed by `kt bench --help` (tests/bench/
//! compare_peers.py looks for it there) and one JSON object with the rates under the names
//! that script reads.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;

fn kt(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_kt")).args(args).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn bench_generate_prints_rates() {
    let help = kt(&["bench", "--help"]);
    assert!(help.lines().any(|l| l.trim_start().starts_with("generate ")), "{help}");

    let model = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/models/qwen2moe/gguf/q4_k.gguf");
    let model = model.to_str().unwrap();
    let base = ["bench", "generate", "--model", model, "--prompt-len", "8", "--gen-len", "4"];
    let json = kt(&[&base[..], &["--threads", "2", "--json"]].concat());
    let v: serde_json::Value = serde_json::from_str(json.trim()).unwrap();
    assert_eq!(v["threads"], 2, "{v}");
    assert_eq!(v["prompt_len"], 8, "{v}");
    assert_eq!(v["gen_len"], 4, "{v}");
    assert_eq!(v["generated"], 4, "{v}");
    assert_eq!(v["matmul"], "ggml", "{v}");
    assert!(v["prefill_tokens_per_s"].as_f64().unwrap() > 0.0, "{v}");
    assert!(v["decode_tokens_per_s"].as_f64().unwrap() > 0.0, "{v}");

    let table = kt(&[&base[..], &["--threads", "1", "--matmul", "f32"]].concat());
    for word in ["prefill", "decode", "tokens/s", "threads  1", "load"] {
        assert!(table.contains(word), "{word}: {table}");
    }
}
