//! `kt healthcheck` against a real expert server (in this process), a fake gateway, and
//! addresses that refuse or never answer: exit 0 only for a serving service, 1 otherwise, and
//! never longer than the timeout.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

fn kt(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kt"));
    cmd.arg("healthcheck").args(args).env_remove("KT_EXPERT_LISTEN");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

#[test]
fn expert_serving_then_gone() {
    let model = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/models/qwen3moe/gguf/q8_0.gguf");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let opts = kt_expert::ServerOptions { threads: Some(1), ..Default::default() };
    let service = kt_expert::load(&model, None, &"all".parse().unwrap(), opts).unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = rt.spawn(kt_expert::serve(service, listener, async {
        let _ = stopped.await;
    }));

    let o = kt(&["expert", &addr], &[]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("serving"), "{}", text(&o));
    // The address from the service's own variable, 0.0.0.0 meaning this machine.
    let port = addr.rsplit_once(':').unwrap().1;
    let o = kt(&["--quiet", "expert"], &[("KT_EXPERT_LISTEN", &format!("0.0.0.0:{port}"))]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(o.stdout.is_empty());
    // An expert server is not a worker.
    let o = kt(&["worker", &addr], &[]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));

    stop.send(()).unwrap();
    rt.block_on(server).unwrap().unwrap();
    let o = kt(&["expert", &addr, "--timeout", "2"], &[]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("cannot connect"), "{}", text(&o));
    // No address and no variable: a clear error.
    let o = kt(&["expert"], &[]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).contains("KT_EXPERT_LISTEN"), "{}", text(&o));
}

/// A one-shot HTTP server answering `reply` to the first request; returns its address.
fn http_once(reply: &'static str) -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 1024];
        while !got.ends_with(b"\r\n\r\n") {
            let n = s.read(&mut buf).unwrap();
            assert!(n > 0, "request cut short: {got:?}");
            got.extend_from_slice(&buf[..n]);
        }
        assert!(got.starts_with(b"GET /health HTTP/1.1\r\n"), "{got:?}");
        s.write_all(reply.as_bytes()).unwrap();
    });
    addr
}

#[test]
fn gateway_status_decides() {
    let ok = http_once("HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok");
    let o = kt(&["gateway", &format!("http://{ok}/")], &[]);
    assert!(o.status.success(), "{}", text(&o));

    let down = http_once("HTTP/1.1 503 Service Unavailable\r\ncontent-length: 9\r\n\r\nno worker");
    let o = kt(&["gateway", &down], &[]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("503: no worker"), "{}", text(&o));
}

#[test]
fn silence_is_bounded_by_the_timeout() {
    // Accepts connections (the kernel does, via the backlog) and never answers.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    for target in ["gateway", "expert"] {
        let t0 = Instant::now();
        let o = kt(&[target, &addr, "--timeout", "0.5"], &[]);
        assert_eq!(o.status.code(), Some(1), "{target}: {}", text(&o));
        assert!(t0.elapsed() < Duration::from_secs(5), "{target} took {:?}", t0.elapsed());
    }
    drop(l);
}
