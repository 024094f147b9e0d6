//! `kt healthcheck`: asks one kt service whether it serves, for container healthchecks and
//! Kubernetes exec probes. Exit status 0 when it does, 1 (with the reason on stderr) when it
//! does not or gives no answer within the timeout.
//!
//! - `expert`, `worker`: the gRPC `Health` of `kt.v1.Expert` / `kt.v1.Worker`; serving means
//!   `STATUS_SERVING`.
//! - `gateway`: `GET /health`; serving means HTTP 200.
//!
//! Without an address, the service's own listen variable (`KT_EXPERT_LISTEN`,
//! `KT_WORKER_LISTEN`, `KT_GATEWAY_LISTEN`) is used, with an unspecified host (`0.0.0.0`, `::`)
//! turned into loopback, so a healthcheck inside the container follows the service's settings.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, ValueEnum};
use kt_proto::v1::expert_client::ExpertClient;
use kt_proto::v1::health_response::Status as Serving;
use kt_proto::v1::worker_client::WorkerClient;
use kt_proto::v1::{HealthRequest, HealthResponse};
use tonic::transport::Endpoint;

/// Environment variable names read here (one place, as STYLE.md asks).
mod env {
    pub const EXPERT_LISTEN: &str = "KT_EXPERT_LISTEN";
    pub const WORKER_LISTEN: &str = "KT_WORKER_LISTEN";
    pub const GATEWAY_LISTEN: &str = "KT_GATEWAY_LISTEN";
    pub const TIMEOUT: &str = "KT_HEALTHCHECK_TIMEOUT";
}

/// Which kind of kt service to ask.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Target {
    /// A `kt-expert` server (gRPC `kt.v1.Expert/Health`).
    Expert,
    /// A `kt-worker` (gRPC `kt.v1.Worker/Health`).
    Worker,
    /// A `kt-gateway` (HTTP `GET /health`).
    Gateway,
}

impl Target {
    fn listen_env(self) -> &'static str {
        match self {
            Target::Expert => env::EXPERT_LISTEN,
            Target::Worker => env::WORKER_LISTEN,
            Target::Gateway => env::GATEWAY_LISTEN,
        }
    }
}

#[derive(Args)]
pub struct HealthArgs {
    /// The kind of service.
    #[arg(value_enum)]
    target: Target,
    /// host:port (or http://host:port) to ask. Default: the service's listen variable
    /// (KT_EXPERT_LISTEN, KT_WORKER_LISTEN or KT_GATEWAY_LISTEN) with 0.0.0.0/:: as loopback.
    addr: Option<String>,
    /// Seconds to wait for the whole check (connect + answer).
    #[arg(long, env = env::TIMEOUT, default_value_t = 3.0)]
    timeout: f64,
    /// Print nothing when the service serves.
    #[arg(long, short)]
    quiet: bool,
}

pub fn run(a: HealthArgs) -> Result<()> {
    if !(a.timeout.is_finite() && a.timeout > 0.0) {
        bail!("--timeout must be a positive number of seconds, got {}", a.timeout);
    }
    let timeout = Duration::from_secs_f64(a.timeout);
    let addr = match &a.addr {
        Some(addr) => host_port(addr),
        None => {
            let var = a.target.listen_env();
            let listen = std::env::var(var)
                .with_context(|| format!("give an address or set {var} (host:port)"))?;
            loopback(&host_port(&listen))
        }
    };
    let what = format!("{:?} at {addr}", a.target).to_lowercase();
    let message = match a.target {
        Target::Expert | Target::Worker => grpc(a.target, &addr, timeout),
        Target::Gateway => http(&addr, timeout),
    }
    .with_context(|| format!("{what} is not healthy"))?;
    if !a.quiet {
        match message.is_empty() {
            true => println!("{what}: serving"),
            false => println!("{what}: serving ({message})"),
        }
    }
    Ok(())
}

/// `http://h:p/` → `h:p`.
fn host_port(addr: &str) -> String {
    let s = addr.trim();
    let s = s.strip_prefix("http://").unwrap_or(s);
    s.trim_end_matches('/').to_string()
}

/// A listen address as a place to connect to: an unspecified host becomes loopback.
fn loopback(listen: &str) -> String {
    if let Some(port) = listen.strip_prefix("0.0.0.0:") {
        format!("127.0.0.1:{port}")
    } else if let Some(port) = listen.strip_prefix("[::]:") {
        format!("[::1]:{port}")
    } else {
        listen.to_string()
    }
}

fn grpc(target: Target, addr: &str, timeout: Duration) -> Result<String> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let reply: HealthResponse = runtime.block_on(async {
        let ask = async {
            let channel = Endpoint::from_shared(format!("http://{addr}"))
                .map_err(|e| anyhow!("bad address {addr:?}: {e}"))?
                .connect_timeout(timeout)
                .connect()
                .await
                .context("cannot connect")?;
            let reply = match target {
                Target::Expert => ExpertClient::new(channel).health(HealthRequest {}).await,
                _ => WorkerClient::new(channel).health(HealthRequest {}).await,
            };
            reply
                .map(tonic::Response::into_inner)
                .map_err(|s| anyhow!("Health failed: {} ({:?})", s.message(), s.code()))
        };
        tokio::time::timeout(timeout, ask)
            .await
            .map_err(|_| anyhow!("no answer within {timeout:?}"))?
    })?;
    match reply.status() {
        Serving::Serving => Ok(reply.message),
        other => bail!("{} {}", other.as_str_name(), reply.message),
    }
}

/// `GET /health` over HTTP/1.1; success is status 200.
fn http(addr: &str, timeout: Duration) -> Result<String> {
    let deadline = Instant::now() + timeout;
    let left = || deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
    let sockets: Vec<SocketAddr> =
        addr.to_socket_addrs().with_context(|| format!("cannot resolve {addr:?}"))?.collect();
    let mut last = anyhow!("{addr:?} resolves to no address");
    for socket in sockets {
        match TcpStream::connect_timeout(&socket, left()) {
            Ok(mut stream) => {
                stream.set_read_timeout(Some(left()))?;
                stream.set_write_timeout(Some(left()))?;
                let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
                let request = format!(
                    "GET /health HTTP/1.1\r\nHost: {host}\r\nUser-Agent: kt-healthcheck\r\n\
                     Connection: close\r\n\r\n"
                );
                // One write; a server may answer and close before reading all of it.
                let sent = stream.write_all(request.as_bytes());
                let mut reply = Vec::new();
                // Only the head is needed; a body over 64 KiB is not read.
                let _ = (&mut stream).take(64 * 1024).read_to_end(&mut reply);
                if let (Err(e), true) = (sent, reply.is_empty()) {
                    bail!("sending GET /health to {socket}: {e}");
                }
                return parse_status(&reply);
            }
            Err(e) => last = anyhow!("cannot connect to {socket}: {e}"),
        }
    }
    Err(last)
}

/// The status line of an HTTP reply: Ok(body snippet) for 200, an error otherwise.
fn parse_status(reply: &[u8]) -> Result<String> {
    let text = String::from_utf8_lossy(reply);
    let line = text.lines().next().unwrap_or("");
    let code = line.split_whitespace().nth(1).and_then(|c| c.parse::<u16>().ok());
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b).trim();
    let body: String = body.chars().take(200).collect();
    match code {
        Some(200) => Ok(body),
        Some(code) => bail!("GET /health answered {code}: {body}"),
        None if reply.is_empty() => bail!("GET /health: no answer"),
        None => bail!("GET /health: not an HTTP reply: {line:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        assert_eq!(host_port("http://gw:8080/"), "gw:8080");
        assert_eq!(loopback("0.0.0.0:50061"), "127.0.0.1:50061");
        assert_eq!(loopback("[::]:80"), "[::1]:80");
        assert_eq!(loopback("10.0.0.2:80"), "10.0.0.2:80");
    }

    #[test]
    fn status_lines() {
        assert_eq!(parse_status(b"HTTP/1.1 200 OK\r\nA: b\r\n\r\nok\n").unwrap(), "ok");
        let e = parse_status(b"HTTP/1.1 503 Service Unavailable\r\n\r\nno worker").unwrap_err();
        assert!(e.to_string().contains("503: no worker"), "{e}");
        assert!(parse_status(b"").is_err());
        assert!(parse_status(b"SSH-2.0-x\r\n").is_err());
    }
}
