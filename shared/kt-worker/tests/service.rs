//! `kt.v1.Worker` over TCP on 127.0.0.1: greedy output and logprobs of every fixture model
//! (HF and each GGUF type) equal single-process `kt_models::generate`; Cancel and a dropped
//! stream give the KV blocks back (as `Info` shows); bad requests get INVALID_ARGUMENT and the
//! worker keeps serving.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{alone, fixture, reference_prompt, MODELS};
use kt_models::Model;
use kt_proto::v1::worker_client::WorkerClient;
use kt_proto::v1::{
    generate_event, CancelRequest, FinishReason as Wire, FinishedEvent, GenerateRequest,
    HealthRequest, SamplingParams as WireSampling, TokenEvent, WorkerInfo, WorkerInfoRequest,
};
use kt_sample::SamplingParams;
use kt_worker::setup::{load_model, ModelOptions};
use kt_worker::{CpuBackend, Engine, EngineOptions, FinishReason, Request, WorkerService};
use tonic::transport::Channel;
use tonic::Code;

/// Serves a worker for the model at `path` on 127.0.0.1 and returns a client and the model.
async fn start(path: std::path::PathBuf, blocks: usize) -> (WorkerClient<Channel>, Arc<Model>) {
    let loaded = tokio::task::spawn_blocking(move || load_model(&ModelOptions::new(path)).unwrap())
        .await
        .unwrap();
    let model = Arc::new(loaded.model);
    let engine =
        Engine::start(CpuBackend::new(model.clone(), 16, blocks), EngineOptions::default())
            .unwrap();
    let service = WorkerService::new(engine, &loaded.name);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(kt_worker::serve(service, listener, std::future::pending()));
    let client = WorkerClient::connect(format!("http://{addr}")).await.unwrap();
    (client, model)
}

fn wire(r: &Request) -> GenerateRequest {
    let s = &r.sampling;
    GenerateRequest {
        request_id: r.id.clone(),
        prompt_tokens: r.prompt.clone(),
        sampling: Some(WireSampling {
            temperature: s.temperature,
            top_k: s.top_k as u32,
            top_p: Some(s.top_p),
            min_p: s.min_p,
            repetition_penalty: Some(s.repetition_penalty),
            presence_penalty: s.presence_penalty,
            frequency_penalty: s.frequency_penalty,
            penalty_window: s.penalty_window.map(|w| w as u32),
            logit_bias: s.logit_bias.clone().into_iter().collect(),
            seed: s.seed,
        }),
        max_tokens: r.max_tokens as u32,
        stop_token_ids: r.stop_ids.clone(),
        top_logprobs: r.top_logprobs as u32,
    }
}

/// Runs a request to its end: the token events and the one finished event.
async fn run(
    client: &mut WorkerClient<Channel>,
    req: GenerateRequest,
) -> Result<(Vec<TokenEvent>, FinishedEvent), tonic::Status> {
    let mut stream = client.generate(req).await?.into_inner();
    let mut tokens = Vec::new();
    while let Some(ev) = stream.message().await? {
        match ev.event.unwrap() {
            generate_event::Event::Token(t) => tokens.push(t),
            generate_event::Event::Finished(f) => {
                assert!(stream.message().await?.is_none(), "events after the finished event");
                return Ok((tokens, f));
            }
        }
    }
    panic!("the stream ended without a finished event");
}

async fn info(client: &mut WorkerClient<Channel>) -> WorkerInfo {
    client.info(WorkerInfoRequest {}).await.unwrap().into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_fixture_model_matches_single_process_generation() {
    for name in MODELS {
        let dir = fixture(name);
        let mut paths = vec![dir.join("hf")];
        for ty in ["f32", "f16", "q8_0", "q4_k"] {
            paths.push(dir.join(format!("gguf/{ty}.gguf")));
        }
        for path in paths {
            let (mut client, model) = start(path.clone(), 64).await;
            let r = Request {
                id: name.to_string(),
                prompt: reference_prompt(name),
                sampling: SamplingParams::greedy(),
                max_tokens: 24,
                stop_ids: vec![],
                top_logprobs: 5,
            };
            let (tokens, fin) = run(&mut client, wire(&r)).await.unwrap();
            let (want, reason) = alone(&model, &r);
            let ids: Vec<u32> = tokens.iter().map(|t| t.token.as_ref().unwrap().id).collect();
            let want_ids: Vec<u32> = want.iter().map(|t| t.id).collect();
            assert_eq!(ids, want_ids, "{}", path.display());
            for (got, want) in tokens.iter().zip(&want) {
                let lp = got.token.as_ref().unwrap().logprob;
                assert!(
                    (lp - want.logprob).abs() <= 1e-5,
                    "{}: {lp} vs {}",
                    path.display(),
                    want.logprob
                );
                assert_eq!(got.top_logprobs.len(), 5);
                for (g, w) in got.top_logprobs.iter().zip(&want.top_logprobs) {
                    assert_eq!(g.id, w.id, "{}", path.display());
                    assert!((g.logprob - w.logprob).abs() <= 1e-5);
                }
            }
            assert_eq!(reason, FinishReason::Length);
            assert_eq!(fin.reason, Wire::Length as i32);
            assert_eq!((fin.prompt_tokens as usize, fin.completion_tokens), (r.prompt.len(), 24));
            assert!(fin.message.is_empty());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn info_and_health_describe_the_worker() {
    let (mut client, model) = start(fixture("deepseek2-lite").join("hf"), 48).await;
    let i = info(&mut client).await;
    assert_eq!(i.model, "hf");
    assert_eq!(i.arch, "deepseek2");
    assert_eq!(i.config_hash, kt_expert::config_hash(&model.config));
    assert_eq!(i.max_context, 128);
    assert_eq!((i.kv_blocks_free, i.kv_blocks_total, i.kv_block_tokens), (48, 48, 16));
    assert_eq!((i.max_batch, i.running, i.waiting), (32, 0, 0));
    assert_eq!(i.experts_per_token, 2);
    assert_eq!(i.devices, vec!["cpu".to_string()]);
    let h = client.health(HealthRequest {}).await.unwrap().into_inner();
    assert_eq!(h.status, kt_proto::v1::health_response::Status::Serving as i32);
}

fn long(id: &str) -> GenerateRequest {
    GenerateRequest {
        request_id: id.into(),
        prompt_tokens: (1..30).collect(),
        sampling: None,
        max_tokens: 0,
        stop_token_ids: vec![],
        top_logprobs: 0,
    }
}

/// Polls `Info` until every block is free and nothing runs (bounded by a generous deadline;
/// no speed is asserted).
async fn blocks_come_back(client: &mut WorkerClient<Channel>) -> WorkerInfo {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let i = info(client).await;
        if i.kv_blocks_free == i.kv_blocks_total && i.running == 0 && i.waiting == 0 {
            return i;
        }
        assert!(tokio::time::Instant::now() < deadline, "blocks never came back: {i:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_and_a_dropped_stream_free_the_blocks() {
    let (mut client, _) = start(fixture("qwen3moe").join("hf"), 40).await;
    // Cancel rpc: the stream ends with CANCELLED.
    let mut stream = client.generate(long("a")).await.unwrap().into_inner();
    let first = stream.message().await.unwrap().unwrap();
    assert!(matches!(first.event, Some(generate_event::Event::Token(_))));
    let mid = info(&mut client).await;
    assert!(mid.kv_blocks_free < mid.kv_blocks_total, "a running sequence holds blocks");
    let found = client.cancel(CancelRequest { request_id: "a".into() }).await.unwrap().into_inner();
    assert!(found.found);
    let fin = loop {
        match stream.message().await.unwrap().unwrap().event.unwrap() {
            generate_event::Event::Token(_) => {}
            generate_event::Event::Finished(f) => break f,
        }
    };
    assert_eq!(fin.reason, Wire::Cancelled as i32);
    assert!(fin.completion_tokens < 128 - 29);
    blocks_come_back(&mut client).await;
    let again = client.cancel(CancelRequest { request_id: "a".into() }).await.unwrap().into_inner();
    assert!(!again.found, "a finished id is not found");

    // The client goes away: the sequence stops and its blocks come back.
    let mut stream = client.generate(long("b")).await.unwrap().into_inner();
    stream.message().await.unwrap().unwrap();
    drop(stream);
    blocks_come_back(&mut client).await;
    // Everything still works, and the id can be used again.
    let (tokens, fin) = run(&mut client, long("b")).await.unwrap();
    assert_eq!((tokens.len(), fin.reason), (128 - 29, Wire::Length as i32));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_invalid_argument_and_the_worker_keeps_serving() {
    let (mut client, _) = start(fixture("mixtral").join("hf"), 32).await;
    let good = GenerateRequest {
        request_id: "g".into(),
        prompt_tokens: vec![5, 6, 7],
        sampling: None,
        max_tokens: 3,
        stop_token_ids: vec![],
        top_logprobs: 0,
    };
    let cases: Vec<(GenerateRequest, &str)> = vec![
        (GenerateRequest { request_id: String::new(), ..good.clone() }, "request_id"),
        (GenerateRequest { prompt_tokens: vec![], ..good.clone() }, "prompt_tokens"),
        (GenerateRequest { prompt_tokens: vec![1, 288], ..good.clone() }, "vocabulary"),
        (GenerateRequest { top_logprobs: 21, ..good.clone() }, "top_logprobs"),
        (
            GenerateRequest {
                sampling: Some(WireSampling { top_p: Some(1.5), ..Default::default() }),
                ..good.clone()
            },
            "top_p",
        ),
        (GenerateRequest { prompt_tokens: vec![1; 200], ..good.clone() }, "context"),
    ];
    for (req, needle) in cases {
        let err = run(&mut client, req).await.err().unwrap();
        assert_eq!(err.code(), Code::InvalidArgument, "{needle}: {err:?}");
        assert!(err.message().contains(needle), "{needle}: {}", err.message());
    }
    // A duplicate live id.
    let mut live = client.generate(long("dup")).await.unwrap().into_inner();
    live.message().await.unwrap().unwrap();
    let err = run(&mut client, long("dup")).await.err().unwrap();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("dup") && err.message().contains("in use"), "{}", err.message());
    drop(live);
    // Still serving.
    let (tokens, fin) = run(&mut client, good).await.unwrap();
    assert_eq!((tokens.len(), fin.reason), (3, Wire::Length as i32));
}
