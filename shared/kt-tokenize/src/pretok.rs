//! Pre-tokenizer families of byte-level BPE vocabularies, keyed by GGUF `tokenizer.ggml.pre`.
//!
//! A byte-level BPE vocabulary is only half a tokenizer: before merging, the text is split into
//! words by one or more regular expressions, and the split differs per model family. GGUF
//! stores only the family name, so the expressions live here. They are the exact expressions
//! llama.cpp applies for each family (`src/llama-vocab.cpp`, `llm_tokenizer_bpe`), applied the
//! same way: each expression in turn splits every piece left by the previous one, keeping both
//! the matches and the text between them (the Hugging Face `Split` pre-tokenizer with the
//! `Isolated` behaviour), and only then are bytes mapped to the GPT-2 byte alphabet.
//!
//! Where llama.cpp rewrote an original `tokenizer.json` expression (for example
//! `(?i:'s|'t|...)` into `(?:'[sS]|'[tT]|...)`), the rewritten form is used.
//!
//! An unknown family name is an error: falling back to another family's split would give
//! plausible but wrong token ids.

/// How one family pre-tokenizes and which flags it implies (before metadata overrides).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct BpeFamily {
    /// The expressions, applied in order.
    pub regexes: &'static [&'static str],
    /// A word that is itself a token is emitted whole, without running merges (llama.cpp's
    /// `ignore_merges`; Hugging Face BPE's `ignore_merges`).
    pub ignore_merges: bool,
    /// Whether `add_special` adds BOS unless `tokenizer.ggml.add_bos_token` says otherwise.
    pub add_bos: bool,
    /// The family has no BOS token by default (GLM).
    pub no_bos: bool,
}

const fn family(regexes: &'static [&'static str]) -> BpeFamily {
    BpeFamily { regexes, ignore_merges: false, add_bos: false, no_bos: false }
}

/// Every `tokenizer.ggml.pre` name kt accepts for `gpt2` vocabularies, with its family.
/// The names grouped on one line share llama.cpp's pre-tokenizer type.
const FAMILIES: &[(&[&str], BpeFamily)] = &[
    (&["default"], family(DEFAULT)),
    (
        &[
            "llama3",
            "llama-v3",
            "llama-bpe",
            "falcon3",
            "falcon-h1",
            "pixtral",
            "midm-2.0",
            "lfm2",
            "jina-v5-nano",
        ],
        BpeFamily { regexes: LLAMA3, ignore_merges: true, add_bos: true, no_bos: false },
    ),
    (&["dbrx", "smaug-bpe"], family(LLAMA3)),
    (&["deepseek-llm"], family(DEEPSEEK_LLM)),
    (&["deepseek-coder"], family(DEEPSEEK_CODER)),
    (&["deepseek-v3", "hunyuan-dense", "joyai-llm", "hy_v4"], family(DEEPSEEK_V3)),
    (&["falcon"], family(FALCON)),
    (
        &[
            "starcoder",
            "refact",
            "command-r",
            "smollm",
            "codeshell",
            "exaone",
            "minerva-7b",
            "mellum2",
        ],
        family(STARCODER),
    ),
    (
        &[
            "gpt-2",
            "phi-2",
            "jina-es",
            "jina-de",
            "gigachat",
            "jina-v2-es",
            "jina-v2-de",
            "a.x-4.0",
            "mellum",
            "modern-bert",
            "exaone4",
            "jina-v1-en",
            "jina-v2-code",
            "roberta-bpe",
            "mpt",
            "olmo",
            "jais",
            "trillion",
            "granite-docling",
        ],
        family(GPT2),
    ),
    (
        &[
            "qwen2",
            "deepseek-r1-qwen",
            "kormo",
            "f2llmv2",
            "megrez",
            "stablelm2",
            "hunyuan",
            "solar-open",
            "grok-2",
        ],
        family(QWEN2),
    ),
    (&["qwen35"], family(QWEN35)),
    (
        &["chatglm-bpe"],
        BpeFamily { regexes: LLAMA3, ignore_merges: false, add_bos: false, no_bos: true },
    ),
    (
        &["glm4", "glm5"],
        BpeFamily { regexes: LLAMA3, ignore_merges: true, add_bos: false, no_bos: true },
    ),
    (&["tekken"], BpeFamily { regexes: TEKKEN, ignore_merges: true, add_bos: true, no_bos: false }),
    (&["gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"], family(GPT4O)),
    (&["bailingmoe", "bailingmoe2", "llada-moe"], family(BAILINGMOE)),
    (&["seed-coder"], family(SEED_CODER)),
];

/// The family for a `tokenizer.ggml.pre` name, or `None` when kt does not know it.
pub(crate) fn bpe_family(pre: &str) -> Option<BpeFamily> {
    FAMILIES.iter().find(|(names, _)| names.contains(&pre)).map(|(_, f)| *f)
}

/// All accepted names, for error messages.
pub(crate) fn known_families() -> String {
    let mut names: Vec<&str> = FAMILIES.iter().flat_map(|(n, _)| n.iter().copied()).collect();
    names.sort_unstable();
    names.join(", ")
}

// The expressions below are written exactly as llama.cpp states them (C and Rust string escapes
// agree, so `"[\r\n]"` holds a real carriage return and line feed, as it does there).

const LLAMA3: &[&str] = &[
    "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
];
const DEEPSEEK_LLM: &[&str] = &[
    "[\r\n]",
    "\\s?[A-Za-zµÀ-ÖØ-öø-ƺƼ-ƿǄ-ʓʕ-ʯͰ-ͳͶͷͻ-ͽͿΆΈ-ΊΌΎ-ΡΣ-ϵϷ-ҁҊ-ԯԱ-ՖႠ-ჅᎠ-Ᏽᏸ-ᏽᲐ-ᲺᲽ-Ჿᴀ-ᴫᵫ-ᵷᵹ-ᶚḀ-ἕἘ-Ἕἠ-ὅὈ-Ὅὐ-ὗὙὛὝὟ-ώᾀ-ᾴᾶ-ᾼιῂ-ῄῆ-ῌῐ-ΐῖ-Ίῠ-Ῥῲ-ῴῶ-ῼℂℇℊ-ℓℕℙ-ℝℤΩℨK-ℭℯ-ℴℹℼ-ℿⅅ-ⅉⅎↃↄⰀ-ⱻⱾ-ⳤⳫ-ⳮⳲⳳꙀ-ꙭꚀ-ꚛꜢ-ꝯꝱ-ꞇꞋ-ꞎꭰ-ꮿﬀ-ﬆﬓ-ﬗＡ-Ｚａ-ｚ𐐀-𐑏𐒰-𐓓𐓘-𐓻𐲀-𐲲𐳀-𐳲𑢠-𑣟𞤀-𞥃]+",
    "\\s?[!-/:-~！-／：-～‘-‟　-。]+",
    "\\s+$",
    "[一-龥ࠀ-一가-퟿]+",
    "\\p{N}+",
];
const DEEPSEEK_V3: &[&str] = &[
    "\\p{N}{1,3}",
    "[一-龥぀-ゟ゠-ヿ]+",
    "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+| ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+",
];
const DEEPSEEK_CODER: &[&str] =
    &["[\r\n]", "\\s?\\p{L}+", "\\s?\\p{P}+", "[一-龥ࠀ-一가-퟿]+", "\\p{N}"];
const FALCON: &[&str] = &[
    "[\\p{P}\\$\\+<=>\\^~\\|`]+",
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)",
    "[0-9][0-9][0-9]",
];
const STARCODER: &[&str] =
    &["\\p{N}", "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)"];
const GPT2: &[&str] =
    &["'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)"];
const QWEN2: &[&str] = &[
    "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
];
const QWEN35: &[&str] = &[
    "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\\r\\n\\p{L}\\p{N}]?[\\p{L}\\p{M}]+|\\p{N}| ?[^\\s\\p{L}\\p{M}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
];
const TEKKEN: &[&str] = &[
    "[^\\r\\n\\p{L}\\p{N}]?((?=[\\p{L}])([^a-z]))*((?=[\\p{L}])([^A-Z]))+|[^\\r\\n\\p{L}\\p{N}]?((?=[\\p{L}])([^a-z]))+((?=[\\p{L}])([^A-Z]))*|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n/]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
];
const GPT4O: &[&str] = &[
    "[^\\r\\n\\p{L}\\p{N}]?((?=[\\p{L}])([^a-z]))*((?=[\\p{L}])([^A-Z]))+(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|[^\\r\\n\\p{L}\\p{N}]?((?=[\\p{L}])([^a-z]))+((?=[\\p{L}])([^A-Z]))*(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n/]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
];
const BAILINGMOE: &[&str] = &[
    "'(?:[sSdDmMtT]|[lL][lL]|[vV][eE]|[rR][eE])|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]|\\s+(?!\\S)|\\s+",
];
const SEED_CODER: &[&str] = &[
    "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1}| ?[^\\s\\p{L}\\p{N}\\r\\n]+|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
];
const DEFAULT: &[&str] = &[
    "[\\p{P}\\$\\+<=>\\^~\\|]+",
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)",
    "\\p{N}+",
    "[0-9][0-9][0-9]",
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_family_compiles_with_onig() {
        for (names, fam) in FAMILIES {
            for re in fam.regexes {
                let split = tokenizers::pre_tokenizers::split::Split::new(
                    tokenizers::pre_tokenizers::split::SplitPattern::Regex((*re).to_owned()),
                    tokenizers::SplitDelimiterBehavior::Isolated,
                    false,
                );
                assert!(split.is_ok(), "{names:?}: {re}: {:?}", split.err());
            }
        }
    }

    #[test]
    fn names_are_unique_and_found() {
        let mut seen = std::collections::HashSet::new();
        for (names, _) in FAMILIES {
            for n in *names {
                assert!(seen.insert(*n), "{n} listed twice");
                assert!(bpe_family(n).is_some());
            }
        }
        assert!(bpe_family("no-such-family").is_none());
        assert_eq!(bpe_family("qwen2").map(|f| f.regexes), Some(QWEN2));
        assert!(bpe_family("llama-bpe").is_some_and(|f| f.ignore_merges && f.add_bos));
    }
}
