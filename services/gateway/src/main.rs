fn main() { eprintln!("kt-gateway: not built yet"); std::process::exit(2) }
