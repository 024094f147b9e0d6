//! Two workers behind one gateway: load spread, prefix affinity, a killed worker taken out
//! (its in-flight request gets a clear error, new requests keep succeeding), and its return.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::atomic::Ordering;

use common::*;
use kt_gateway::sim::SimWorker;
use kt_gateway::GatewayConfig;
use serde_json::{json, Value};

const MODEL: &str = "qwen3moe-tiny";

fn body(content: &str, max_tokens: u32, stream: bool) -> Value {
    json!({"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens, "stream": stream})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_spread_fail_over_and_rejoin() {
    let card = card();
    let cfg = sim_config(&card);
    let w0 = SimHandle::start(SimWorker::new(cfg.clone()), "127.0.0.1:0".parse().unwrap());
    let mut w1 = SimHandle::start(SimWorker::new(cfg.clone()), "127.0.0.1:0".parse().unwrap());
    let (s0, s1) = (w0.sim.stats(), w1.sim.stats());
    let gw = start_gateway(
        GatewayConfig { routing: fast_routing(), ..Default::default() },
        card,
        &[w0.addr, w1.addr],
    )
    .await;
    let a = gw.addr;
    assert_eq!(gw.gateway.healthy_workers(), 2);

    // Load is spread: 8 concurrent distinct conversations.
    let reqs: Vec<_> = (0..8)
        .map(|i| {
            tokio::spawn(async move {
                post(a, "/v1/chat/completions", body(&format!("conversation {i}"), 30, false)).await
            })
        })
        .collect();
    for r in reqs {
        assert_eq!(r.await.unwrap().status, 200);
    }
    let (n0, n1) = (s0.started.load(Ordering::SeqCst), s1.started.load(Ordering::SeqCst));
    assert_eq!(n0 + n1, 8);
    assert!(n0 >= 2 && n1 >= 2, "spread: {n0} / {n1}");

    // Kill worker 1 while it serves a stream: that stream ends with a clear error.
    let mut victim = None;
    for i in 0..4 {
        let mut st =
            Streamed::open(a, "/v1/chat/completions", body(&format!("long {i}"), 200, true)).await;
        assert!(st.next_record("\n\n").await.is_some());
        if s1.live.load(Ordering::SeqCst) == 1 {
            victim = Some(st);
            break;
        }
        drop(st);
        eventually(5, "idle", || s0.live.load(Ordering::SeqCst) == 0).await;
    }
    let victim = victim.expect("a stream landed on worker 1");
    let w1_addr = w1.addr;
    w1.kill();
    let events = victim.sse_all().await;
    let err = events
        .iter()
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
        .find(|v| v.get("error").is_some())
        .expect("an error event");
    assert_eq!(err["error"]["type"], "service_unavailable", "{err}");
    assert!(err["error"]["message"].as_str().unwrap().contains("retry"));
    assert_eq!(events.last().unwrap(), "[DONE]");
    // New requests keep succeeding (on worker 0) and the dead one is out.
    let before0 = s0.started.load(Ordering::SeqCst);
    for i in 0..4 {
        let r = post(a, "/v1/chat/completions", body(&format!("after {i}"), 5, false)).await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    assert_eq!(s0.started.load(Ordering::SeqCst), before0 + 4);
    eventually(5, "worker 1 out", || gw.gateway.healthy_workers() == 1).await;
    let m = get(a, "/metrics").await.text();
    assert!(m.contains(&format!("kt_gateway_worker_healthy{{worker=\"{w1_addr}\"}} 0")), "{m}");

    // Restart on the same address: it rejoins and gets work again.
    let w1b = SimHandle::start(SimWorker::new(cfg), w1_addr);
    eventually(10, "worker 1 back", || gw.gateway.healthy_workers() == 2).await;
    let reqs: Vec<_> = (0..8)
        .map(|i| {
            tokio::spawn(async move {
                post(a, "/v1/chat/completions", body(&format!("again {i}"), 30, false)).await
            })
        })
        .collect();
    for r in reqs {
        assert_eq!(r.await.unwrap().status, 200);
    }
    assert!(w1b.sim.stats().started.load(Ordering::SeqCst) >= 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_conversation_prefix_stays_on_one_worker() {
    let card = card();
    let mut cfg = sim_config(&card);
    cfg.max_context = 4096;
    let w0 = SimHandle::start(SimWorker::new(cfg.clone()), "127.0.0.1:0".parse().unwrap());
    let w1 = SimHandle::start(SimWorker::new(cfg), "127.0.0.1:0".parse().unwrap());
    let routing = kt_gateway::RoutingConfig { affinity_block_tokens: 8, ..fast_routing() };
    let gw =
        start_gateway(GatewayConfig { routing, ..Default::default() }, card, &[w0.addr, w1.addr])
            .await;
    let system = "You are a helpful assistant that answers in one sentence. ".repeat(3);
    for convo in 0..4 {
        let mut messages = vec![
            json!({"role": "system", "content": system}),
            json!({"role": "user", "content": format!("question {convo}")}),
        ];
        let mut seen = Vec::new();
        for turn in 0..3 {
            let (b0, b1) = (
                w0.sim.stats().started.load(Ordering::SeqCst),
                w1.sim.stats().started.load(Ordering::SeqCst),
            );
            let r = post(
                gw.addr,
                "/v1/chat/completions",
                json!({"model": MODEL, "messages": messages, "max_tokens": 4}),
            )
            .await;
            assert_eq!(r.status, 200, "{}", r.text());
            let v = r.json();
            let on0 = w0.sim.stats().started.load(Ordering::SeqCst) > b0;
            assert!(on0 || w1.sim.stats().started.load(Ordering::SeqCst) > b1);
            seen.push(on0);
            messages.push(
                json!({"role": "assistant", "content": v["choices"][0]["message"]["content"]}),
            );
            messages.push(json!({"role": "user", "content": format!("follow-up {turn}")}));
        }
        assert!(seen.iter().all(|&x| x == seen[0]), "conversation {convo} moved: {seen:?}");
    }
}
