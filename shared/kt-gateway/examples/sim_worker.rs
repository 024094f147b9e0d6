//! A simulated `kt.v1.Worker` process for end-to-end tests of the gateway (tests/e2e) and for
//! trying the gateway without a model: `cargo run --release -p kt-gateway --example
//! sim_worker -- --listen 127.0.0.1:0`. Prints `listening on ADDR` once bound.
//!
//! Flags: `--listen ADDR` (default 127.0.0.1:50071), `--model PATH` (whose tokenizer the
//! simulated tokens and scripted replies use; default the embedded model),
//! `--token-interval-ms MS` (default 2), `--max-context N` (default 4096).
//!
//! Scripted replies (a prompt containing the word on the left gets the text on the right,
//! then the first stop id): `stopword` → `Hello world. STOP here and more`; `weather` → a
//! Hermes `<tool_call>` for `get_weather(city=Paris)`; `jsonplease` → `{"a": [1, 2], "b":
//! "x"}` followed by other words; `badjson` → `this is not json`; continuations of the call
//! opening that `tool_choice` puts at the start of the reply: `forcecity` → the arguments
//! `{"city": "Paris"}}` of a named call, `anycall` → a whole `get_time(zone=CET)` call,
//! `nocall` → plain text. Other prompts get hashed one-letter tokens (greedy and seeded
//! requests are reproducible).

use std::time::Duration;

use kt_gateway::sim::{SimConfig, SimReply, SimWorker};
use kt_gateway::ModelCard;
use kt_proto::v1::worker_server::WorkerServer;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut listen = "127.0.0.1:50071".to_owned();
    let mut model = None;
    let mut interval_ms = 2.0f64;
    let mut max_context = 4096u32;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{a} needs a value"));
        match a.as_str() {
            "--listen" => listen = value()?,
            "--model" => model = Some(std::path::PathBuf::from(value()?)),
            "--token-interval-ms" => interval_ms = value()?.parse()?,
            "--max-context" => max_context = value()?.parse()?,
            other => return Err(format!("unknown flag {other}").into()),
        }
    }
    let card = match &model {
        Some(p) => ModelCard::from_path(p, None)?,
        None => ModelCard::embedded()?,
    };
    let mut cfg = SimConfig::for_model(&card);
    cfg.max_context = max_context;
    cfg.token_interval = Duration::from_secs_f64(interval_ms / 1e3);
    cfg.replies = [
        SimReply::text(&card, "stopword", "Hello world. STOP here and more"),
        SimReply::text(
            &card,
            "weather",
            "Let me look.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>",
        ),
        SimReply::text(&card, "jsonplease", "  {\"a\": [1, 2], \"b\": \"x\"} trailing words"),
        SimReply::text(&card, "badjson", "this is not json"),
        SimReply::text(&card, "forcecity", " {\"city\": \"Paris\"}}\n</tool_call> and more"),
        SimReply::text(
            &card,
            "anycall",
            "{\"name\": \"get_time\", \"arguments\": {\"zone\": \"CET\"}}\n</tool_call>",
        ),
        SimReply::text(&card, "nocall", "I would rather not."),
    ]
    .concat();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(&listen).await?;
        println!("listening on {}", listener.local_addr()?);
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        tonic::transport::Server::builder()
            .add_service(WorkerServer::new(SimWorker::new(cfg)))
            .serve_with_incoming_shutdown(incoming, async {
                let _ = tokio::signal::ctrl_c().await;
            })
            .await?;
        Ok(())
    })
}
