//! Tokenizes text with the tokenizer of a model path and prints the ids, their pieces and the
//! time taken to load.
//!
//! ```text
//! cargo run --release -p kt-tokenize --example tokenize -- MODEL_PATH "text to tokenize"
//! ```
//!
//! MODEL_PATH is anything `Tokenizer::for_model_path` accepts: a Hugging Face folder, a
//! `tokenizer.json`, a `.gguf` file or a folder of them. Special tokens in the text are parsed.

use std::time::Instant;

use kt_tokenize::Tokenizer;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (Some(path), Some(text)) = (args.next(), args.next()) else {
        eprintln!("usage: tokenize MODEL_PATH TEXT");
        std::process::exit(2);
    };
    let t0 = Instant::now();
    let tok = Tokenizer::for_model_path(&path)?;
    let load = t0.elapsed();
    let t1 = Instant::now();
    let ids = tok.encode(&text, true)?;
    let encode = t1.elapsed();
    println!("{tok:?}");
    println!("loaded in {load:.2?}, encoded {} bytes in {encode:.2?}", text.len());
    for id in &ids {
        let piece = String::from_utf8_lossy(tok.token_to_piece(*id, false)?);
        println!("{id:>8} {piece:?}");
    }
    println!("decoded: {:?}", tok.decode(&ids, false)?);
    Ok(())
}
