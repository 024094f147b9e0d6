//! Every route against a simulated worker over real sockets.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;
use kt_gateway::GatewayConfig;
use serde_json::{json, Value};

const MODEL: &str = "qwen3moe-tiny";

fn chat(content: &str) -> Value {
    json!({"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 8, "temperature": 0})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_completion_non_streaming_with_usage() {
    let s = setup().await;
    let r = post(s.gw.addr, "/v1/chat/completions", chat("Hi there")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["model"], MODEL);
    let c = &v["choices"][0];
    assert_eq!(c["finish_reason"], "length");
    assert_eq!(c["message"]["role"], "assistant");
    let text = c["message"]["content"].as_str().unwrap();
    assert_eq!(text.len(), 8, "eight one-letter tokens: {text:?}");
    let u = &v["usage"];
    assert_eq!(u["completion_tokens"], 8);
    let card = card();
    let prompt = card
        .template
        .render(&kt_chat_template::ChatRequest {
            messages: vec![json!({"role": "user", "content": "Hi there"})],
            add_generation_prompt: true,
            ..Default::default()
        })
        .unwrap();
    let n_prompt = card.tokenizer.encode_with(&prompt, false, true).unwrap().len();
    assert_eq!(u["prompt_tokens"], n_prompt);
    assert_eq!(u["total_tokens"], n_prompt + 8);
    assert!(r.header("x-request-id").is_some());
    // Greedy is deterministic.
    let again = post(s.gw.addr, "/v1/chat/completions", chat("Hi there")).await.json();
    assert_eq!(again["choices"][0]["message"]["content"], text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_completion_streaming_matches_and_ends_with_done() {
    let s = setup().await;
    let full = post(s.gw.addr, "/v1/chat/completions", chat("stream me")).await.json();
    let mut body = chat("stream me");
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let st = Streamed::open(s.gw.addr, "/v1/chat/completions", body).await;
    assert_eq!(st.status, 200);
    assert!(st.headers["content-type"].to_str().unwrap().starts_with("text/event-stream"));
    let events = st.sse_all().await;
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> =
        events[..events.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let text: String =
        chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
    assert_eq!(text, full["choices"][0]["message"]["content"].as_str().unwrap());
    let finish: Vec<&Value> =
        chunks.iter().map(|c| &c["choices"][0]["finish_reason"]).filter(|f| !f.is_null()).collect();
    assert_eq!(finish, vec![&json!("length")]);
    let usage = &chunks.last().unwrap()["usage"];
    assert_eq!(usage["completion_tokens"], 8);
    assert_eq!(chunks.last().unwrap()["choices"], json!([]));
    assert_eq!(usage["prompt_tokens"], full["usage"]["prompt_tokens"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_strings_cut_the_text_streaming_and_not() {
    let s = setup().await;
    let mut body = chat("stopword");
    body["max_tokens"] = json!(60);
    body["stop"] = json!(["STOP", "never"]);
    let v = post(s.gw.addr, "/v1/chat/completions", body.clone()).await.json();
    assert_eq!(v["choices"][0]["message"]["content"], "Hello world. ");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    body["stream"] = json!(true);
    body["stop"] = json!("STOP");
    let events = Streamed::open(s.gw.addr, "/v1/chat/completions", body).await.sse_all().await;
    let text: String = events
        .iter()
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(text, "Hello world. ");
    // The scripted reply ends with the EOS id: finish "stop" without a stop string.
    let mut body = chat("stopword");
    body["max_tokens"] = json!(60);
    let v = post(s.gw.addr, "/v1/chat/completions", body).await.json();
    assert_eq!(v["choices"][0]["message"]["content"], "Hello world. STOP here and more");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_reproduces_and_n_gives_distinct_choices() {
    let s = setup().await;
    let mut body = chat("tell me a story");
    body["temperature"] = json!(0.9);
    body["seed"] = json!(42);
    let a = post(s.gw.addr, "/v1/chat/completions", body.clone()).await.json();
    let b = post(s.gw.addr, "/v1/chat/completions", body.clone()).await.json();
    assert_eq!(a["choices"][0]["message"]["content"], b["choices"][0]["message"]["content"]);
    body["seed"] = json!(43);
    let c = post(s.gw.addr, "/v1/chat/completions", body.clone()).await.json();
    assert_ne!(a["choices"][0]["message"]["content"], c["choices"][0]["message"]["content"]);
    body["n"] = json!(3);
    let v = post(s.gw.addr, "/v1/chat/completions", body).await.json();
    let texts: Vec<&str> = v["choices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["message"]["content"].as_str().unwrap())
        .collect();
    assert_eq!(texts.len(), 3);
    assert_ne!(texts[0], texts[1]);
    assert_eq!(v["usage"]["completion_tokens"], 24);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logprobs_chat_and_completions() {
    let s = setup().await;
    let mut body = chat("logprobs");
    body["logprobs"] = json!(true);
    body["top_logprobs"] = json!(3);
    let v = post(s.gw.addr, "/v1/chat/completions", body).await.json();
    let content = v["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(content.len(), 8);
    let text: String = content.iter().map(|t| t["token"].as_str().unwrap()).collect();
    assert_eq!(text, v["choices"][0]["message"]["content"].as_str().unwrap());
    for t in content {
        let lp = t["logprob"].as_f64().unwrap();
        assert!(lp <= 0.0);
        let top = t["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 3);
        assert_eq!(top[0]["logprob"].as_f64().unwrap(), lp);
        assert!(top[1]["logprob"].as_f64().unwrap() < lp);
    }
    let v = post(
        s.gw.addr,
        "/v1/completions",
        json!({"model": MODEL, "prompt": "Once", "max_tokens": 5, "logprobs": 2, "temperature": 0}),
    )
    .await
    .json();
    let lp = &v["choices"][0]["logprobs"];
    assert_eq!(lp["tokens"].as_array().unwrap().len(), 5);
    assert_eq!(lp["token_logprobs"].as_array().unwrap().len(), 5);
    assert_eq!(lp["top_logprobs"][0].as_object().unwrap().len(), 2);
    assert_eq!(lp["text_offset"][0], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_streaming_echo_and_token_prompts() {
    let s = setup().await;
    let v = post(s.gw.addr, "/v1/completions", json!({"model": MODEL, "prompt": "The cat", "max_tokens": 4, "temperature": 0, "echo": true})).await.json();
    assert_eq!(v["object"], "text_completion");
    let text = v["choices"][0]["text"].as_str().unwrap();
    assert!(text.starts_with("The cat") && text.len() == "The cat".len() + 4, "{text}");
    assert_eq!(v["usage"]["completion_tokens"], 4);
    let ids = card().tokenizer.encode("The cat", true).unwrap();
    let w = post(
        s.gw.addr,
        "/v1/completions",
        json!({"model": MODEL, "prompt": ids, "max_tokens": 4, "temperature": 0}),
    )
    .await
    .json();
    assert_eq!(w["choices"][0]["text"].as_str().unwrap(), &text["The cat".len()..]);
    assert_eq!(w["usage"]["prompt_tokens"], ids.len());
    let events = Streamed::open(
        s.gw.addr,
        "/v1/completions",
        json!({"model": MODEL, "prompt": ["a", "b"], "max_tokens": 3, "stream": true}),
    )
    .await
    .sse_all()
    .await;
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> =
        events[..events.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect();
    let finished: Vec<u64> = chunks
        .iter()
        .filter(|c| !c["choices"][0]["finish_reason"].is_null())
        .map(|c| c["choices"][0]["index"].as_u64().unwrap())
        .collect();
    assert_eq!(finished.len(), 2);
    assert!(finished.contains(&0) && finished.contains(&1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tool_calls_are_parsed_for_a_tool_template() {
    let s = setup_sim(GatewayConfig::default(), tools_card(), |c| c.max_context = 4096).await;
    let tools = json!([{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]);
    let body = json!({"model": MODEL, "messages": [{"role": "user", "content": "What is the weather in Paris?"}], "tools": tools, "max_tokens": 100});
    let v = post(s.gw.addr, "/v1/chat/completions", body.clone()).await.json();
    let c = &v["choices"][0];
    assert_eq!(c["finish_reason"], "tool_calls", "{v}");
    assert_eq!(c["message"]["content"], "Let me look.");
    let call = &c["message"]["tool_calls"][0];
    assert_eq!(call["type"], "function");
    assert_eq!(call["function"]["name"], "get_weather");
    let args: Value =
        serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
    assert_eq!(args, json!({"city": "Paris"}));
    // Streaming: content, then one tool_calls delta, then finish_reason tool_calls.
    let mut sbody = body.clone();
    sbody["stream"] = json!(true);
    let events = Streamed::open(s.gw.addr, "/v1/chat/completions", sbody).await.sse_all().await;
    let chunks: Vec<Value> = events.iter().filter_map(|e| serde_json::from_str(e).ok()).collect();
    let text: String =
        chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
    assert_eq!(text.trim(), "Let me look.");
    assert!(!text.contains("<tool_call"), "{text}");
    // The call streams: its first delta names it (with id and type), later ones add
    // arguments; all before the finish reason.
    let calls: Vec<&Value> =
        chunks.iter().filter_map(|c| c["choices"][0]["delta"].get("tool_calls")).collect();
    assert!(calls.len() > 1, "{chunks:?}");
    assert_eq!(calls[0][0]["function"]["name"], "get_weather");
    assert_eq!(calls[0][0]["type"], "function");
    assert!(calls[0][0]["id"].as_str().unwrap().starts_with("call_"));
    assert!(calls.iter().all(|c| c[0]["index"] == 0));
    assert!(calls[1..]
        .iter()
        .all(|c| c[0]["function"].get("name").is_none() && c[0].get("id").is_none()));
    let streamed: String =
        calls.iter().map(|c| c[0]["function"]["arguments"].as_str().unwrap()).collect();
    assert_eq!(streamed, call["function"]["arguments"].as_str().unwrap());
    let last_call =
        chunks.iter().rposition(|c| c["choices"][0]["delta"].get("tool_calls").is_some()).unwrap();
    let finish =
        chunks.iter().position(|c| c["choices"][0]["finish_reason"] == "tool_calls").unwrap();
    assert!(last_call < finish);
    // The tool result goes back through the template (arguments given as a JSON string).
    let mut follow = body;
    follow["messages"] = json!([
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": null, "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"}
    ]);
    let r = post(s.gw.addr, "/v1/chat/completions", follow).await;
    assert_eq!(r.status, 200, "{}", r.text());
    // Ollama's /api/chat gives the same call with arguments as an object.
    let o = post(s.gw.addr, "/api/chat", json!({"model": MODEL, "stream": false, "messages": [{"role": "user", "content": "weather?"}], "tools": tools, "options": {"num_predict": 100}})).await.json();
    assert_eq!(o["message"]["tool_calls"][0]["function"]["arguments"], json!({"city": "Paris"}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tool_choice_required_and_named_start_the_reply_with_a_call() {
    // (No tool is named after the `weather` script of the simulator.)
    let s = setup_sim(GatewayConfig::default(), tools_card(), |c| c.max_context = 4096).await;
    let tools = json!([
        {"type": "function", "function": {"name": "find_city", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}},
        {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}}}}
    ]);
    let ask = |content: &str, choice: Value| json!({"model": MODEL, "messages": [{"role": "user", "content": content}], "tools": tools, "tool_choice": choice, "max_tokens": 200});
    let named = json!({"type": "function", "function": {"name": "find_city"}});
    // Named: the gateway writes the call's opening with the name; the model the arguments.
    // Generation stops where the call's object closes.
    let v = post(s.gw.addr, "/v1/chat/completions", ask("forcecity", named.clone())).await.json();
    let c = &v["choices"][0];
    assert_eq!(c["finish_reason"], "tool_calls", "{v}");
    assert_eq!(c["message"]["content"], Value::Null);
    assert_eq!(c["message"]["tool_calls"][0]["function"]["name"], "find_city");
    assert_eq!(c["message"]["tool_calls"][0]["function"]["arguments"], r#"{"city":"Paris"}"#);
    assert!(
        v["usage"]["completion_tokens"].as_u64().unwrap() < 25,
        "stopped at the call's end: {v}"
    );
    // Streaming: the name comes in the first delta, before any token of the arguments.
    let mut sbody = ask("forcecity", named);
    sbody["stream"] = json!(true);
    let events = Streamed::open(s.gw.addr, "/v1/chat/completions", sbody).await.sse_all().await;
    let chunks: Vec<Value> = events.iter().filter_map(|e| serde_json::from_str(e).ok()).collect();
    let calls: Vec<&Value> =
        chunks.iter().filter_map(|c| c["choices"][0]["delta"].get("tool_calls")).collect();
    assert_eq!(calls[0][0]["function"]["name"], "find_city");
    let args: String =
        calls.iter().map(|c| c[0]["function"]["arguments"].as_str().unwrap()).collect();
    assert_eq!(args, r#"{"city":"Paris"}"#);
    assert!(chunks.iter().all(|c| c["choices"][0]["delta"].get("content").is_none_or(|t| t == "")));
    assert!(chunks.iter().any(|c| c["choices"][0]["finish_reason"] == "tool_calls"));
    // Required: the gateway writes the call marker; the model picks the tool.
    let v = post(s.gw.addr, "/v1/chat/completions", ask("anycall", json!("required"))).await.json();
    let c = &v["choices"][0];
    assert_eq!(c["finish_reason"], "tool_calls", "{v}");
    assert_eq!(c["message"]["tool_calls"][0]["function"]["name"], "get_time");
    assert_eq!(c["message"]["tool_calls"][0]["function"]["arguments"], r#"{"zone":"CET"}"#);
    // A reply that is no call although one is required: an error, not a silent text answer.
    let r = post(s.gw.addr, "/v1/chat/completions", ask("nocall", json!("required"))).await;
    assert_eq!(r.status, 500, "{}", r.text());
    assert!(r.json()["error"]["message"].as_str().unwrap().contains("tool_choice"));
    // Invalid values name `tool_choice`.
    for (choice, with_tools) in [
        (json!({"type": "function", "function": {"name": "nope"}}), true),
        (json!({"type": "custom", "custom": {"name": "find_city"}}), true),
        (json!({"type": "function"}), true),
        (json!(7), true),
        (json!("sometimes"), true),
        (json!("required"), false),
    ] {
        let mut body = ask("x", choice.clone());
        if !with_tools {
            body.as_object_mut().unwrap().remove("tools");
        }
        let r = post(s.gw.addr, "/v1/chat/completions", body).await;
        assert_eq!(r.status, 400, "{choice} -> {}", r.text());
        assert_eq!(r.json()["error"]["param"], "tool_choice", "{choice}");
    }
    let mut body = ask("x", json!("required"));
    body["response_format"] = json!({"type": "json_object"});
    let r = post(s.gw.addr, "/v1/chat/completions", body).await;
    assert_eq!((r.status, r.json()["error"]["param"].clone()), (400, json!("tool_choice")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tool_choice_required_needs_a_template_with_tool_calls() {
    let s = setup().await;
    let tools = json!([{"type": "function", "function": {"name": "f"}}]);
    let body = json!({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "tools": tools, "tool_choice": "required"});
    let r = post(s.gw.addr, "/v1/chat/completions", body).await;
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(r.json()["error"]["param"], "tool_choice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_mode_cuts_at_the_object_and_rejects_non_json() {
    let s = setup().await;
    let mut body = chat("jsonplease");
    body["max_tokens"] = json!(100);
    body["response_format"] = json!({"type": "json_object"});
    let v = post(s.gw.addr, "/v1/chat/completions", body.clone()).await.json();
    let content = v["choices"][0]["message"]["content"].as_str().unwrap();
    assert_eq!(serde_json::from_str::<Value>(content).unwrap(), json!({"a": [1, 2], "b": "x"}));
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    let mut bad = chat("badjson");
    bad["response_format"] = json!({"type": "json_object"});
    let r = post(s.gw.addr, "/v1/chat/completions", bad).await;
    assert_eq!(r.status, 500);
    assert!(r.json()["error"]["message"].as_str().unwrap().contains("JSON"));
    let o = post(
        s.gw.addr,
        "/api/generate",
        json!({"model": MODEL, "prompt": "jsonplease", "format": "json", "stream": false}),
    )
    .await
    .json();
    assert_eq!(serde_json::from_str::<Value>(o["response"].as_str().unwrap()).unwrap()["b"], "x");
    let r = post(s.gw.addr, "/v1/chat/completions", json!({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_schema"}})).await;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["param"], "response_format.type");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_routes() {
    let s = setup().await;
    let v = get(s.gw.addr, "/v1/models").await.json();
    assert_eq!(v["object"], "list");
    assert_eq!(v["data"][0]["id"], MODEL);
    let m = get(s.gw.addr, &format!("/v1/models/{MODEL}")).await;
    assert_eq!(m.status, 200);
    assert_eq!(m.json()["id"], MODEL);
    let r = get(s.gw.addr, "/v1/models/gpt-4").await;
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["error"]["code"], "model_not_found");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ollama_chat_and_generate() {
    let s = setup().await;
    let body = json!({"model": format!("{MODEL}:latest"), "messages": [{"role": "user", "content": "hello"}], "options": {"num_predict": 6, "temperature": 0}});
    let st = Streamed::open(s.gw.addr, "/api/chat", body.clone()).await;
    assert_eq!(st.status, 200);
    assert_eq!(st.headers["content-type"], "application/x-ndjson");
    let lines = st.ndjson_all().await;
    let last = lines.last().unwrap();
    assert_eq!(last["done"], true);
    assert_eq!(last["done_reason"], "length");
    assert_eq!(last["eval_count"], 6);
    for k in [
        "total_duration",
        "load_duration",
        "prompt_eval_count",
        "prompt_eval_duration",
        "eval_duration",
    ] {
        assert!(last[k].as_u64().is_some(), "{k} in {last}");
    }
    assert!(lines[..lines.len() - 1]
        .iter()
        .all(|l| l["done"] == false && l["message"]["role"] == "assistant"));
    let streamed: String =
        lines.iter().map(|l| l["message"]["content"].as_str().unwrap()).collect();
    let mut nb = body;
    nb["stream"] = json!(false);
    let one = post(s.gw.addr, "/api/chat", nb).await.json();
    assert_eq!(one["message"]["content"], streamed);
    assert_eq!(one["done"], true);
    // generate: system + prompt through the template, raw prompt, context continuation.
    let g = post(s.gw.addr, "/api/generate", json!({"model": MODEL, "prompt": "Why?", "system": "Be brief.", "stream": false, "options": {"num_predict": 3, "seed": 1}})).await.json();
    assert_eq!(g["eval_count"], 3);
    assert_eq!(g["response"].as_str().unwrap().len(), 3);
    let ctx = g["context"].as_array().unwrap().clone();
    assert_eq!(ctx.len(), g["prompt_eval_count"].as_u64().unwrap() as usize + 3);
    let raw = post(s.gw.addr, "/api/generate", json!({"model": MODEL, "prompt": "abc", "raw": true, "stream": false, "context": ctx, "options": {"num_predict": 2}})).await.json();
    assert_eq!(
        raw["prompt_eval_count"].as_u64().unwrap() as usize,
        ctx.len() + card().tokenizer.encode("abc", false).unwrap().len()
    );
    let lines = Streamed::open(s.gw.addr, "/api/generate", json!({"model": MODEL, "prompt": "stopword", "options": {"stop": ["STOP"], "num_predict": 50}})).await.ndjson_all().await;
    let text: String = lines.iter().map(|l| l["response"].as_str().unwrap()).collect();
    assert_eq!(text, "Hello world. ");
    assert_eq!(lines.last().unwrap()["done_reason"], "stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ollama_model_routes_report_real_facts() {
    let s = setup().await;
    let t = get(s.gw.addr, "/api/tags").await.json();
    let m = &t["models"][0];
    assert_eq!(m["name"], format!("{MODEL}:latest"));
    assert_eq!(m["details"]["family"], "qwen3moe");
    assert_eq!(m["details"]["quantization_level"], "Q8_0");
    assert_eq!(m["details"]["format"], "gguf");
    assert!(m["size"].as_u64().unwrap() > 100_000);
    let show = post(s.gw.addr, "/api/show", json!({"model": MODEL})).await.json();
    let info = &show["model_info"];
    assert_eq!(info["general.architecture"], "qwen3moe");
    let g = kt_formats::embedded::open().unwrap();
    let params: u64 = g.tensor_infos().map(|t| t.numel() as u64).sum();
    assert_eq!(info["general.parameter_count"], params);
    assert_eq!(
        info["qwen3moe.context_length"],
        g.metadata().get_u32("qwen3moe.context_length").unwrap()
    );
    assert!(show["template"].is_string());
    let r = post(s.gw.addr, "/api/show", json!({"model": "llama3"})).await;
    assert_eq!(r.status, 404);
    assert!(r.json()["error"].as_str().unwrap().contains("llama3"));
    let ps = get(s.gw.addr, "/api/ps").await.json();
    assert_eq!(ps["models"][0]["name"], format!("{MODEL}:latest"));
    assert!(get(s.gw.addr, "/api/version").await.json()["version"].is_string());
    let head = raw(s.gw.addr, "HEAD", "/", &[], Vec::new()).await;
    assert_eq!(head.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_parameters_are_400_naming_the_parameter() {
    let s = setup().await;
    let a = s.gw.addr;
    let cases = [
        (
            json!({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "temperature": "hot"}),
            "temperature",
        ),
        (
            json!({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "temperature": 3.0}),
            "temperature",
        ),
        (
            json!({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "top_p": 5}),
            "top_p",
        ),
        (
            json!({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": -1}),
            "max_tokens",
        ),
        (
            json!({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}),
            "max_tokens",
        ),
        (json!({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "n": 0}), "n"),
        (
            json!({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "logit_bias": {"abc": 1}}),
            "logit_bias",
        ),
        (
            json!({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "logit_bias": {"99999": 1}}),
            "logit_bias",
        ),
        (
            json!({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "presence_penalty": 9}),
            "presence_penalty",
        ),
        (
            json!({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "top_logprobs": 3}),
            "top_logprobs",
        ),
        (
            json!({"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}),
            "messages[0].role",
        ),
        (
            json!({"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}),
            "messages[0].content[0].type",
        ),
        (json!({"model": MODEL, "messages": []}), "messages"),
        (
            json!({"model": MODEL, "messages": [{"role": "user", "content": 5}]}),
            "messages[0].content",
        ),
        (
            json!({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "tool_choice": "sometimes"}),
            "tool_choice",
        ),
        (
            json!({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "stop": ["a", "b", "c", "d", "e"]}),
            "stop",
        ),
    ];
    for (body, param) in cases {
        let r = post(a, "/v1/chat/completions", body.clone()).await;
        assert_eq!(r.status, 400, "{body} -> {}", r.text());
        let e = r.json();
        assert_eq!(e["error"]["param"], param, "{body} -> {e}");
        assert_eq!(e["error"]["type"], "invalid_request_error");
        assert!(e["error"]["message"].as_str().unwrap().len() > 5);
    }
    // A missing required field.
    let r = post(a, "/v1/chat/completions", json!({"messages": []})).await;
    assert_eq!(r.status, 400);
    // FIM on a tokenizer without FIM tokens.
    let r = post(
        a,
        "/v1/completions",
        json!({"model": MODEL, "prompt": "def f(", "suffix": "return x"}),
    )
    .await;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["param"], "suffix");
    // Ollama shape.
    let r = post(
        a,
        "/api/generate",
        json!({"model": MODEL, "prompt": "x", "options": {"num_predict": -5}}),
    )
    .await;
    assert_eq!(r.status, 400);
    assert!(r.json()["error"].is_string());
    let r = post(
        a,
        "/api/chat",
        json!({"model": MODEL, "messages": [{"role": "user", "content": "x", "images": ["aGk="]}]}),
    )
    .await;
    assert_eq!(r.status, 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_bodies_get_clear_4xx() {
    let s =
        setup_with(GatewayConfig { max_body_bytes: 64 * 1024, ..Default::default() }, card()).await;
    let a = s.gw.addr;
    let ct = [("content-type", "application/json")];
    for (path, body) in [
        ("/v1/chat/completions", b"{\"model\": ".to_vec()),
        ("/v1/chat/completions", b"not json at all".to_vec()),
        ("/v1/chat/completions", Vec::new()),
        ("/v1/chat/completions", b"[1,2,3]".to_vec()),
        ("/v1/chat/completions", b"{\"model\": \"m\"} trailing".to_vec()),
        (
            "/v1/chat/completions",
            [b"{\"model\": \"".as_slice(), &[0xff, 0xfe], b"\", \"messages\": []}"].concat(),
        ),
        ("/api/chat", b"{{{".to_vec()),
        (
            "/api/generate",
            [b"{\"model\": \"x\", \"prompt\": \"".as_slice(), &[0xc3, 0x28], b"\"}"].concat(),
        ),
    ] {
        let r = raw(a, "POST", path, &ct, body.clone()).await;
        assert_eq!(r.status, 400, "{path} {:?} -> {}", String::from_utf8_lossy(&body), r.text());
        let t = r.text();
        assert!(!t.contains("panicked") && !t.contains("/src/") && !t.contains(".rs"), "{t}");
        let v = r.json();
        assert!(v["error"].is_object() || v["error"].is_string());
    }
    let huge = format!(
        "{{\"model\": \"{MODEL}\", \"messages\": [{{\"role\": \"user\", \"content\": \"{}\"}}]}}",
        "a".repeat(100_000)
    );
    let r = raw(a, "POST", "/v1/chat/completions", &ct, huge.clone().into_bytes()).await;
    assert_eq!(r.status, 413);
    assert_eq!(r.json()["error"]["code"], "request_too_large");
    let r = raw(a, "POST", "/api/chat", &ct, huge.into_bytes()).await;
    assert_eq!(r.status, 413);
    assert!(r.json()["error"].is_string());
    // Unknown routes and methods, in each flavor.
    let r = get(a, "/v1/nothing").await;
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["error"]["code"], "unknown_url");
    let r = get(a, "/api/embed").await;
    assert_eq!(r.status, 404);
    assert!(r.json()["error"].is_string());
    let r = get(a, "/v1/chat/completions").await;
    assert_eq!(r.status, 405);
    assert!(r.json()["error"]["message"].is_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn context_length_exceeded_gives_the_numbers() {
    let s = setup().await; // the sim reports a 256-token context
    let mut body = chat("hi");
    body["max_tokens"] = json!(1000);
    let r = post(s.gw.addr, "/v1/chat/completions", body).await;
    assert_eq!(r.status, 400);
    let e = r.json();
    assert_eq!(e["error"]["code"], "context_length_exceeded");
    let m = e["error"]["message"].as_str().unwrap();
    assert!(m.contains("256") && m.contains("1000"), "{m}");
    let long = "word ".repeat(400);
    let r = post(s.gw.addr, "/v1/completions", json!({"model": MODEL, "prompt": long})).await;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["code"], "context_length_exceeded");
    // Ollama's num_ctx is a limit.
    let r = post(s.gw.addr, "/api/generate", json!({"model": MODEL, "prompt": "x", "raw": true, "options": {"num_ctx": 4, "num_predict": 10}})).await;
    assert_eq!(r.status, 400);
    assert!(r.json()["error"].as_str().unwrap().contains("maximum context length is 4"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_on_every_api_route() {
    let cfg = GatewayConfig { api_keys: vec!["k1".into(), "k2".into()], ..Default::default() };
    let s = setup_with(cfg, card()).await;
    let a = s.gw.addr;
    for (m, p) in [
        ("GET", "/v1/models"),
        ("POST", "/v1/chat/completions"),
        ("POST", "/v1/completions"),
        ("GET", "/api/tags"),
        ("POST", "/api/chat"),
        ("POST", "/api/generate"),
        ("POST", "/api/show"),
        ("GET", "/api/ps"),
        ("GET", "/api/version"),
    ] {
        let r = raw(a, m, p, &[], Vec::new()).await;
        assert_eq!(r.status, 401, "{m} {p}");
        let r = raw(a, m, p, &[("authorization", "Bearer nope")], Vec::new()).await;
        assert_eq!(r.status, 401, "{m} {p}");
        if p.starts_with("/v1") {
            assert_eq!(r.json()["error"]["code"], "invalid_api_key");
        } else {
            assert!(r.json()["error"].is_string());
        }
    }
    let ok = raw(a, "GET", "/v1/models", &[("authorization", "Bearer k2")], Vec::new()).await;
    assert_eq!(ok.status, 200);
    let ok = raw(a, "GET", "/api/tags", &[("x-api-key", "k1")], Vec::new()).await;
    assert_eq!(ok.status, 200);
    // Operations routes and the UI are open.
    assert_eq!(get(a, "/health").await.status, 200);
    assert_eq!(get(a, "/").await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_queue_is_429_and_queue_timeout_is_503_with_retry_after() {
    let cfg = GatewayConfig {
        max_running: 1,
        max_queue: 1,
        queue_timeout: Duration::from_millis(300),
        ..Default::default()
    };
    let s = setup_sim(cfg, card(), |c| c.token_interval = Duration::from_millis(20)).await;
    let a = s.gw.addr;
    let mut long = chat("long one");
    long["max_tokens"] = json!(200);
    long["stream"] = json!(true);
    let mut holder = Streamed::open(a, "/v1/chat/completions", long).await;
    assert!(holder.next_record("\n\n").await.is_some());
    // One waits in the queue (and times out), the next finds the queue full.
    let waiter = tokio::spawn(async move { post(a, "/v1/chat/completions", chat("second")).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let full = post(a, "/v1/chat/completions", chat("third")).await;
    assert_eq!(full.status, 429, "{}", full.text());
    assert!(full.header("retry-after").unwrap().parse::<u64>().unwrap() >= 1);
    assert_eq!(full.json()["error"]["type"], "rate_limit_error");
    let timed_out = waiter.await.unwrap();
    assert_eq!(timed_out.status, 503, "{}", timed_out.text());
    assert!(timed_out.header("retry-after").is_some());
    let o = post(a, "/api/generate", json!({"model": MODEL, "prompt": "x"})).await;
    assert_eq!(o.status, 503);
    assert!(o.json()["error"].is_string());
    drop(holder);
    let m = get(a, "/metrics").await.text();
    assert!(m.contains("kt_gateway_rejected_total{reason=\"queue_full\"} 1"), "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_disconnect_cancels_the_sequence_and_frees_kv() {
    let s = setup().await;
    let stats = s.sim.sim.stats();
    for path in ["/v1/chat/completions", "/api/chat"] {
        let before = stats.cancelled.load(Ordering::SeqCst);
        let mut body = chat("a long answer please");
        body["max_tokens"] = json!(150);
        body["options"] = json!({"num_predict": 150});
        body["stream"] = json!(true);
        let mut st = Streamed::open(s.gw.addr, path, body).await;
        assert_eq!(st.status, 200, "{path}");
        let first = st.next_record("\n").await;
        assert!(first.is_some(), "{path}");
        assert_eq!(stats.live.load(Ordering::SeqCst), 1);
        assert!(stats.kv_blocks_used.load(Ordering::SeqCst) > 0);
        drop(st);
        eventually(5, "cancel on the worker", || {
            stats.cancelled.load(Ordering::SeqCst) == before + 1
        })
        .await;
        eventually(5, "KV blocks freed", || {
            stats.live.load(Ordering::SeqCst) == 0
                && stats.kv_blocks_used.load(Ordering::SeqCst) == 0
        })
        .await;
    }
    // Non-streaming: the client gives up before the answer is complete.
    let before = stats.cancelled.load(Ordering::SeqCst);
    let mut body = chat("slow");
    body["max_tokens"] = json!(150);
    let a = s.gw.addr;
    let h = tokio::spawn(async move { post(a, "/v1/chat/completions", body).await });
    eventually(5, "sequence started", || stats.live.load(Ordering::SeqCst) == 1).await;
    h.abort();
    eventually(5, "cancel on the worker", || stats.cancelled.load(Ordering::SeqCst) == before + 1)
        .await;
    eventually(5, "KV blocks freed", || stats.kv_blocks_used.load(Ordering::SeqCst) == 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_ready_metrics_and_web() {
    let s = setup().await;
    let a = s.gw.addr;
    assert_eq!(get(a, "/health").await.json()["status"], "ok");
    assert_eq!(get(a, "/ready").await.json()["healthy_workers"], 1);
    post(a, "/v1/chat/completions", chat("count me")).await;
    let m = get(a, "/metrics").await;
    assert!(m.header("content-type").unwrap().starts_with("text/plain"));
    let t = m.text();
    for needle in [
        "kt_gateway_requests_total{route=\"/v1/chat/completions\",status=\"200\"} 1",
        "kt_gateway_time_to_first_token_seconds_count 1",
        "kt_gateway_time_per_output_token_seconds_count 7",
        "kt_gateway_completion_tokens_total 8",
        "kt_gateway_queue_depth 0",
        "kt_gateway_worker_healthy{worker=",
    ] {
        assert!(t.contains(needle), "{needle} missing in\n{t}");
    }
    let html = get(a, "/").await;
    assert!(html.header("content-type").unwrap().starts_with("text/html"));
    assert!(html.text().contains("<html"));
    assert_eq!(get(a, "/web/").await.text(), html.text());
    let js = get(a, "/web/app.js").await;
    assert!(js.header("content-type").unwrap().starts_with("text/javascript"));
    assert!(get(a, "/web/style.css").await.header("content-type").unwrap().starts_with("text/css"));
    assert_eq!(get(a, "/web/nope.js").await.status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_preflight_and_headers() {
    let cfg =
        GatewayConfig { cors_origins: vec!["http://ui.example".into()], ..Default::default() };
    let s = setup_with(cfg, card()).await;
    let r = raw(
        s.gw.addr,
        "OPTIONS",
        "/v1/chat/completions",
        &[("origin", "http://ui.example"), ("access-control-request-method", "POST")],
        Vec::new(),
    )
    .await;
    assert_eq!(r.status, 204);
    assert_eq!(r.header("access-control-allow-origin").unwrap(), "http://ui.example");
    assert!(r.header("access-control-allow-headers").unwrap().contains("authorization"));
    let r =
        raw(s.gw.addr, "GET", "/v1/models", &[("origin", "http://evil.example")], Vec::new()).await;
    assert_eq!(r.status, 200);
    assert!(r.header("access-control-allow-origin").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_process_worker_channel() {
    let card = card();
    let sim = kt_gateway::sim::SimWorker::new(sim_config(&card));
    let channel =
        kt_gateway::in_process_channel(kt_proto::v1::worker_server::WorkerServer::new(sim.clone()));
    let gw = kt_gateway::Gateway::new(
        GatewayConfig::default(),
        card,
        vec![kt_gateway::WorkerEndpoint { name: "local".into(), channel }],
    )
    .unwrap();
    gw.check_workers().await;
    assert_eq!(gw.healthy_workers(), 1);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = listener.local_addr().unwrap();
    tokio::spawn(gw.serve(listener, std::future::pending()));
    let v = post(a, "/v1/chat/completions", chat("in process")).await.json();
    assert_eq!(v["usage"]["completion_tokens"], 8);
    assert_eq!(sim.stats().started.load(Ordering::SeqCst), 1);
}
