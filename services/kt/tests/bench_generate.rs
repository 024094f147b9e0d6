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

/// `--int8-from`: `kt bench generate` reports the repack and the experts' kernel; `kt generate`
/// gives the same output with an `--int8-from` no call reaches as without it, and with 0
/// (every call on the int8 copies) as many tokens with logprobs within int8 rounding.
#[test]
fn int8_from_flag() {
    let model = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/models/qwen2moe/gguf/q4_k.gguf");
    let model = model.to_str().unwrap();
    let base = ["bench", "generate", "--model", model, "--prompt-len", "8", "--gen-len", "4"];
    let json = kt(&[&base[..], &["--threads", "2", "--json", "--int8-from", "0"]].concat());
    let v: serde_json::Value = serde_json::from_str(json.trim()).unwrap();
    assert_eq!(v["generated"], 4, "{v}");
    assert!(v["repack_s"].as_f64().unwrap() >= 0.0, "{v}");
    assert!(v["experts_kernel"].as_str().unwrap().starts_with("amx_int8"), "{v}");
    let json = kt(&[&base[..], &["--json"]].concat());
    let v: serde_json::Value = serde_json::from_str(json.trim()).unwrap();
    assert!(v["repack_s"].is_null(), "{v}");
    assert_eq!(v["experts_kernel"], "fused", "{v}");
    let table = kt(&[&base[..], &["--int8-from", "32"]].concat());
    assert!(table.contains("experts  fused below 32 tokens, amx_int8"), "{table}");
    assert!(table.contains("repack "), "{table}");

    let gen = ["generate", "--model", model, "--prompt-tokens", "1,2,3,4,5,6,7,8"];
    let gen = [&gen[..], &["--max-tokens", "4", "--ignore-eos", "--matmul", "ggml", "--json"]];
    let run = |extra: &[&str]| -> serde_json::Value {
        serde_json::from_str(kt(&[&gen.concat()[..], extra].concat()).trim()).unwrap()
    };
    let plain = run(&[]);
    assert_eq!(run(&["--int8-from", "1000000"]), plain);
    let int8 = run(&["--int8-from", "0"]);
    let tokens = |v: &serde_json::Value| v["tokens"].as_array().unwrap().clone();
    assert_eq!(tokens(&int8).len(), 4, "{int8}");
    let lp = |t: &serde_json::Value| t["logprob"].as_f64().unwrap();
    let first = (&tokens(&int8)[0], &tokens(&plain)[0]);
    assert_eq!(first.0["id"], first.1["id"], "{int8} {plain}");
    assert!((lp(first.0) - lp(first.1)).abs() < 0.5, "{int8} {plain}");
}
