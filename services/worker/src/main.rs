fn main() { eprintln!("kt-worker: not built yet"); std::process::exit(2) }
