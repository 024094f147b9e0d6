//! The shared-memory transport: same results as gRPC and as local experts; falls back to gRPC
//! when the proof fails; hostile ring contents from either side give errors, never a hang or
//! a crash, and the server keeps serving.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kt_expert::metrics::Via;
use kt_expert::{
    identity, ExpertService, LinkKind, RemoteExperts, RemoteOptions, Selection, ServerHandle,
    ServerOptions, ShmMode,
};
use kt_models::{generate, Experts, GenerateParams, Generation, MatmulMode, Model, Routing};
use kt_proto::shm::{self, Layout, Ring};
use kt_proto::v1::expert_client::ExpertClient;
use kt_proto::v1::{ExpertInfoRequest, ModelIdentity, ShmOpenRequest};
use kt_proto::{hash_hex, WireDType, CONFIG_HASH_HEADER, SHM_RING_HEADER, SHM_STATUS_HEADER};
use kt_sample::{Sampler, SamplingParams};

const MODEL: &str = "qwen2moe";

fn hf(model: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models").join(model).join("hf")
}

fn prompt(model: &str) -> Vec<u32> {
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(hf(model).join("../reference/hf.json")).unwrap())
            .unwrap();
    v["prompt_tokens"].as_array().unwrap().iter().map(|t| t.as_u64().unwrap() as u32).collect()
}

fn params() -> GenerateParams {
    GenerateParams { max_tokens: 16, top_logprobs: 4, stop_ids: vec![] }
}

fn greedy() -> Sampler {
    Sampler::new(SamplingParams::greedy()).unwrap()
}

/// A private directory standing in for another container's /dev/shm.
fn other_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("kt-shm-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn service(model: &str, shm_dir: Option<PathBuf>) -> ExpertService {
    let opts =
        ServerOptions { threads: Some(1), name: "all".into(), shm_dir, ..ServerOptions::default() };
    kt_expert::load(&hf(model), None, &Selection::default(), opts).unwrap()
}

fn ours(model: &str) -> ModelIdentity {
    let parts = kt_models::open(&hf(model), None, MatmulMode::F32).unwrap();
    identity("hf", &parts.config)
}

fn worker(model: &str, experts: Arc<dyn Experts>) -> Model {
    let parts = kt_models::open(&hf(model), None, MatmulMode::F32).unwrap();
    Model::load_with(
        parts.config,
        parts.source.tensors(),
        parts.scheme,
        MatmulMode::F32,
        &|_, _| false,
    )
    .unwrap()
    .with_experts(experts)
}

fn run(model: &Model) -> Generation {
    generate(model, &prompt(MODEL), &params(), &mut greedy(), |_| true).unwrap()
}

fn bits(g: &Generation) -> Vec<(u32, u64)> {
    g.tokens.iter().map(|t| (t.id, t.logprob.to_bits())).collect()
}

#[test]
fn shm_gives_the_same_results_as_grpc_and_local_experts() {
    let svc = service(MODEL, Some(shm::HOST_SHM_DIR.into()));
    let metrics = svc.metrics();
    let server = ServerHandle::start(svc, "127.0.0.1:0").unwrap();
    let addr = server.addr().to_string();
    let me = ours(MODEL);
    let shm = RemoteExperts::connect(
        &addr,
        &me,
        RemoteOptions { shm: ShmMode::Required, ..RemoteOptions::default() },
    )
    .unwrap();
    assert_eq!(shm.transport(), Some(LinkKind::Shm), "{:?}", shm.shm_note());
    let grpc = RemoteExperts::connect(
        &addr,
        &me,
        RemoteOptions { shm: ShmMode::Off, ..RemoteOptions::default() },
    )
    .unwrap();
    assert_eq!(grpc.transport(), Some(LinkKind::Grpc));

    let local = kt_models::load(&hf(MODEL), None, MatmulMode::F32).unwrap();
    let want = run(&local.model);
    let got_shm = run(&worker(MODEL, Arc::new(shm)));
    let shm_calls = metrics.requests(Via::Shm);
    assert!(shm_calls > 0, "no call went through the ring");
    let got_grpc = run(&worker(MODEL, Arc::new(grpc)));
    assert_eq!(bits(&got_shm), bits(&got_grpc), "shm and gRPC differ");
    assert_eq!(bits(&got_shm), bits(&want), "shm and local experts differ");
    assert_eq!(metrics.requests(Via::Shm), shm_calls, "the gRPC client used the ring");

    // bf16 on the wire: both transports round the same way.
    let bf16 =
        |mode| RemoteOptions { shm: mode, dtype: WireDType::Bf16, ..RemoteOptions::default() };
    let a = RemoteExperts::connect(&addr, &me, bf16(ShmMode::Required)).unwrap();
    let b = RemoteExperts::connect(&addr, &me, bf16(ShmMode::Off)).unwrap();
    assert_eq!(bits(&run(&worker(MODEL, Arc::new(a)))), bits(&run(&worker(MODEL, Arc::new(b)))));

    // Calls bigger than a slot go over the stream of the same link.
    let small = RemoteExperts::connect(
        &addr,
        &me,
        RemoteOptions { shm: ShmMode::Required, shm_max_tokens: 1, ..RemoteOptions::default() },
    )
    .unwrap();
    let before = metrics.requests(Via::Grpc);
    assert_eq!(bits(&run(&worker(MODEL, Arc::new(small)))), bits(&want));
    assert!(metrics.requests(Via::Grpc) > before, "the prompt (many tokens) should use gRPC");
}

#[test]
fn proof_failure_falls_back_to_grpc() {
    // The server's "/dev/shm" is another directory: same boot id, different device/inode, as
    // two containers that share a kernel but not /dev/shm.
    let dir = other_dir("fallback");
    let server = ServerHandle::start(service(MODEL, Some(dir.clone())), "127.0.0.1:0").unwrap();
    let addr = server.addr().to_string();
    let me = ours(MODEL);
    let auto = RemoteExperts::connect(&addr, &me, RemoteOptions::default()).unwrap();
    assert_eq!(auto.transport(), Some(LinkKind::Grpc));
    let note = auto.shm_note().unwrap();
    assert!(note.contains("different shared-memory directories"), "{note}");
    let local = kt_models::load(&hf(MODEL), None, MatmulMode::F32).unwrap();
    assert_eq!(bits(&run(&worker(MODEL, Arc::new(auto)))), bits(&run(&local.model)));

    let err = RemoteExperts::connect(
        &addr,
        &me,
        RemoteOptions { shm: ShmMode::Required, ..RemoteOptions::default() },
    )
    .unwrap_err();
    assert!(err.to_string().contains("shared memory is required"), "{err}");

    // A server that offers no shared memory at all.
    let none = ServerHandle::start(service(MODEL, None), "127.0.0.1:0").unwrap();
    let c =
        RemoteExperts::connect(&none.addr().to_string(), &me, RemoteOptions::default()).unwrap();
    assert_eq!(c.transport(), Some(LinkKind::Grpc));
    assert!(c.shm_note().unwrap().contains("offers no shared memory"));
    std::fs::remove_dir_all(dir).unwrap();
}

/// The raw handshake, as a client would do it by hand: OpenShm, map, acknowledge, attach.
struct RawRing {
    rt: tokio::runtime::Runtime,
    client: ExpertClient<tonic::transport::Channel>,
    me: ModelIdentity,
}

impl RawRing {
    fn new(addr: &str) -> Self {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let client = rt.block_on(ExpertClient::connect(format!("http://{addr}"))).unwrap();
        RawRing { rt, client, me: ours(MODEL) }
    }

    fn offer(&mut self, layout: Layout) -> kt_proto::v1::ShmOffer {
        let host = kt_proto::shm::HostId::of(Path::new(shm::HOST_SHM_DIR)).unwrap();
        let req = ShmOpenRequest {
            config_hash: self.me.config_hash,
            host: Some(host.to_proto()),
            slots: layout.slots as u32,
            slot_bytes: layout.slot_bytes as u64,
        };
        self.rt.block_on(self.client.open_shm(req)).unwrap().into_inner()
    }

    /// Opens a Forward stream attaching ring `name`; returns the server's `kt-shm` answer and
    /// the stream's sender (dropping it ends the stream and the ring).
    fn attach(
        &mut self,
        name: &str,
    ) -> (String, tokio::sync::mpsc::UnboundedSender<kt_proto::v1::ExpertRequest>) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let mut req = tonic::Request::new(tokio_stream::wrappers::UnboundedReceiverStream::new(rx));
        req.metadata_mut()
            .insert(CONFIG_HASH_HEADER, hash_hex(self.me.config_hash).parse().unwrap());
        req.metadata_mut().insert(SHM_RING_HEADER, name.parse().unwrap());
        let resp = self.rt.block_on(self.client.forward(req)).unwrap();
        let status = resp.metadata().get(SHM_STATUS_HEADER).unwrap().to_str().unwrap().to_string();
        (status, tx)
    }
}

fn wait_state(ring: &Ring, slot: usize, want: u32) {
    let t = Instant::now();
    while ring.slot_state(slot).unwrap() != want {
        assert!(t.elapsed() < Duration::from_secs(10), "slot {slot} never reached state {want}");
        std::thread::sleep(Duration::from_micros(50));
    }
}

#[test]
fn hostile_client_rings_get_errors_and_the_server_keeps_serving() {
    let svc = service(MODEL, Some(shm::HOST_SHM_DIR.into()));
    let parts = kt_models::open(&hf(MODEL), None, MatmulMode::F32).unwrap();
    let h = parts.config.hidden;
    let layer = (0..parts.config.n_layers).find(|&l| parts.config.is_moe_layer(l)).unwrap();
    let server = ServerHandle::start(svc, "127.0.0.1:0").unwrap();
    let addr = server.addr().to_string();
    let mut raw = RawRing::new(&addr);
    let layout = Layout::for_calls(2, 4, h, 4, WireDType::F32).unwrap();
    let dir = Path::new(shm::HOST_SHM_DIR);

    // A ring whose nonce was never acknowledged is not served.
    let offer = raw.offer(layout);
    let (status, _tx) = raw.attach(&offer.name);
    assert!(status.starts_with("refused") && status.contains("acknowledge"), "{status}");
    // Nor one that was never offered.
    let (status, _tx2) = raw.attach("kt-expert-no-such-ring");
    assert!(status.starts_with("refused"), "{status}");

    let offer = raw.offer(layout);
    let ring = Ring::open(dir, &offer.name, layout, offer.nonce).unwrap();
    let (status, tx) = raw.attach(&offer.name);
    assert_eq!(status, "attached");
    assert!(!dir.join(&offer.name).exists(), "the server removes the name once attached");

    let hidden = vec![0.25f32; h];
    let good = |seq: u64| {
        ring.post_request(0, seq, layer, &hidden, h, &[0, 1], &[0.5, 0.5], 2, WireDType::F32)
            .unwrap();
        wait_state(&ring, 0, shm::RESPONSE);
        ring.take_response(0, seq, 1, h, WireDType::F32).unwrap()
    };
    let out = good(1).unwrap();
    assert_eq!(out.len(), h);
    // Garbage in the request fields: each answered with INVALID_ARGUMENT.
    let cases: [(usize, u32, &str); 5] = [
        (shm::offsets::N, u32::MAX, "tokens"),
        (shm::offsets::N, 1000, "do not fit"),
        (shm::offsets::K, 1000, "`k`"),
        (shm::offsets::DTYPE, 3, "F16"),
        (shm::offsets::N, 0, "no tokens"),
    ];
    for (i, (off, value, what)) in cases.into_iter().enumerate() {
        let seq = 10 + i as u64;
        ring.write_request(1, seq, layer, &hidden, h, &[0, 1], &[0.5, 0.5], 2, WireDType::F32)
            .unwrap();
        ring.poke(1, off, &value.to_le_bytes()).unwrap();
        ring.publish_request(1).unwrap();
        wait_state(&ring, 1, shm::RESPONSE);
        let (code, msg) = ring.take_response(1, seq, 1, h, WireDType::F32).unwrap().unwrap_err();
        assert_eq!(code, kt_proto::v1::expert_error::Code::InvalidArgument as u32, "{msg}");
        assert!(msg.contains(what), "{what}: {msg}");
    }
    // NaN hidden states and an expert out of range.
    ring.post_request(1, 20, layer, &vec![f32::NAN; h], h, &[0, 1], &[0.5, 0.5], 2, WireDType::F32)
        .unwrap();
    wait_state(&ring, 1, shm::RESPONSE);
    assert!(ring.take_response(1, 20, 1, h, WireDType::F32).unwrap().is_err());
    ring.post_request(1, 21, layer, &hidden, h, &[0, 9999], &[0.5, 0.5], 2, WireDType::F32)
        .unwrap();
    wait_state(&ring, 1, shm::RESPONSE);
    let (_, msg) = ring.take_response(1, 21, 1, h, WireDType::F32).unwrap().unwrap_err();
    assert!(msg.contains("9999"), "{msg}");
    // Still serving good requests.
    assert_eq!(good(30).unwrap(), out);

    // A slot in a state the protocol does not have: the server closes the ring.
    ring.poke(1, shm::offsets::STATE, &77u32.to_le_bytes()).unwrap();
    let t = Instant::now();
    while ring.ring_state() != shm::RING_CLOSED {
        assert!(t.elapsed() < Duration::from_secs(10), "the ring was not closed");
        std::thread::sleep(Duration::from_millis(1));
    }
    drop(tx);
    // …and the server still answers everyone else.
    let c = RemoteExperts::connect(&addr, &raw.me, RemoteOptions::default()).unwrap();
    let r = Routing { k: 2, ids: vec![0, 1], weights: vec![0.5, 0.5] };
    assert_eq!(c.forward(layer, &hidden, &r).unwrap(), out);
    assert_eq!(c.transport(), Some(LinkKind::Shm));
    // What the server refuses comes back typed as refused (not a lost link), on both
    // transports.
    let off = RemoteOptions { shm: ShmMode::Off, ..RemoteOptions::default() };
    let g = RemoteExperts::connect(&addr, &raw.me, off).unwrap();
    assert_eq!(g.transport(), Some(LinkKind::Grpc));
    let bad = Routing { k: 2, ids: vec![0, 9999], weights: vec![0.5, 0.5] };
    for (client, how) in [(&c, "shm"), (&g, "grpc")] {
        match client.forward(layer, &hidden, &bad) {
            Err(kt_models::ModelError::ExpertsRefused(m)) => {
                assert!(m.contains("9999"), "{how}: {m}")
            }
            other => panic!("{how}: {other:?}"),
        }
    }
    let info = raw.rt.block_on(raw.client.info(ExpertInfoRequest::default())).unwrap();
    assert!(info.into_inner().shm.is_some());
}

mod hostile_server {
    //! A server that answers `Info` and `Forward` as a real one (it delegates to one) but
    //! makes its own ring and writes broken answers into it.

    use super::*;
    use kt_proto::v1::expert_server::{Expert, ExpertServer};
    use kt_proto::v1::{ExpertInfo, ExpertRequest, HealthRequest, HealthResponse, ShmOffer};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Mutex;
    use tonic::{Request, Response, Status, Streaming};

    #[derive(Clone, Copy, Debug)]
    pub enum Fault {
        /// Answers with a sequence number nobody asked for.
        WrongSeq,
        /// Claims a longer answer than a slot holds.
        HugeLength,
        /// Puts the slot in a state the protocol does not have.
        BadState,
        /// Never answers (a stalled poller).
        Silent,
    }

    pub struct Hostile {
        pub real: ExpertService,
        pub fault: Fault,
        pub ring: Arc<Mutex<Option<Arc<Ring>>>>,
        pub stop: Arc<AtomicBool>,
    }

    #[tonic::async_trait]
    impl Expert for Hostile {
        type ForwardStream = <ExpertService as Expert>::ForwardStream;

        async fn forward(
            &self,
            request: Request<Streaming<ExpertRequest>>,
        ) -> Result<Response<Self::ForwardStream>, Status> {
            let mut resp = self.real.forward(request).await?;
            resp.metadata_mut().insert(SHM_STATUS_HEADER, "attached".parse().unwrap());
            let ring = self.ring.lock().unwrap().clone().unwrap();
            ring.set_ring_state(shm::RING_SERVING);
            let (fault, stop) = (self.fault, self.stop.clone());
            let model = self.real.info().model.clone().unwrap();
            let shape = kt_proto::SeamShape {
                hidden: model.hidden as usize,
                n_layers: model.n_layers as usize,
                n_experts: model.n_experts as usize,
            };
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    for slot in 0..ring.layout().slots {
                        if ring.slot_state(slot).unwrap() != shm::REQUEST {
                            continue;
                        }
                        let (seq, _) =
                            ring.take_request(slot, &shape, &kt_proto::Limits::default()).unwrap();
                        let poke = |off: usize, v: &[u8]| ring.poke(slot, off, v).unwrap();
                        match fault {
                            Fault::Silent => {}
                            Fault::WrongSeq => {
                                ring.post_response(slot, 12345, Err((3, "wrong"))).unwrap()
                            }
                            Fault::HugeLength => {
                                poke(shm::offsets::STATUS, &3u32.to_le_bytes());
                                poke(shm::offsets::RSEQ, &seq.to_le_bytes());
                                poke(shm::offsets::RLEN, &u64::MAX.to_le_bytes());
                                poke(shm::offsets::STATE, &shm::RESPONSE.to_le_bytes());
                            }
                            Fault::BadState => poke(shm::offsets::STATE, &42u32.to_le_bytes()),
                        }
                    }
                    std::thread::sleep(Duration::from_micros(100));
                }
            });
            Ok(resp)
        }

        async fn info(
            &self,
            request: Request<kt_proto::v1::ExpertInfoRequest>,
        ) -> Result<Response<ExpertInfo>, Status> {
            let mut info = Expert::info(&self.real, request).await?.into_inner();
            let host = kt_proto::shm::HostId::of(Path::new(shm::HOST_SHM_DIR)).unwrap();
            info.shm = Some(host.to_proto());
            Ok(Response::new(info))
        }

        async fn health(
            &self,
            request: Request<HealthRequest>,
        ) -> Result<Response<HealthResponse>, Status> {
            self.real.health(request).await
        }

        async fn open_shm(
            &self,
            request: Request<ShmOpenRequest>,
        ) -> Result<Response<ShmOffer>, Status> {
            let req = request.into_inner();
            let layout = Layout { slots: req.slots as usize, slot_bytes: req.slot_bytes as usize };
            let name = format!("kt-hostile-{}-{:?}", std::process::id(), self.fault);
            let ring = Ring::create(Path::new(shm::HOST_SHM_DIR), &name, layout).unwrap();
            let offer = ShmOffer {
                name,
                nonce: ring.nonce(),
                size: layout.size().unwrap() as u64,
                slots: req.slots,
                slot_bytes: req.slot_bytes,
            };
            *self.ring.lock().unwrap() = Some(Arc::new(ring));
            Ok(Response::new(offer))
        }
    }

    pub fn start(fault: Fault) -> (tokio::runtime::Runtime, String, Arc<AtomicBool>) {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let stop = Arc::new(AtomicBool::new(false));
        let svc = Hostile {
            real: service(MODEL, None),
            fault,
            ring: Arc::new(Mutex::new(None)),
            stop: stop.clone(),
        };
        rt.spawn(async move {
            tonic::transport::Server::builder()
                .add_service(ExpertServer::new(svc))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                .await
                .unwrap();
        });
        (rt, addr, stop)
    }
}

#[test]
fn hostile_server_rings_give_errors_and_calls_fall_back_to_grpc() {
    use hostile_server::Fault;
    let parts = kt_models::open(&hf(MODEL), None, MatmulMode::F32).unwrap();
    let h = parts.config.hidden;
    let layer = (0..parts.config.n_layers).find(|&l| parts.config.is_moe_layer(l)).unwrap();
    let hidden = vec![0.25f32; h];
    let r = Routing { k: 2, ids: vec![0, 1], weights: vec![0.5, 0.5] };
    let want = service(MODEL, None).info().clone();
    assert!(!want.held.is_empty());
    for (fault, what) in [
        (Fault::WrongSeq, "answers request 12345"),
        (Fault::HugeLength, "error message of"),
        (Fault::BadState, "state 42"),
        (Fault::Silent, "did not answer"),
    ] {
        let (rt, addr, stop) = hostile_server::start(fault);
        let opts = RemoteOptions {
            shm: ShmMode::Required,
            timeout: Duration::from_secs(1),
            ..RemoteOptions::default()
        };
        let c = RemoteExperts::connect(&addr, &ours(MODEL), opts).unwrap();
        assert_eq!(c.transport(), Some(LinkKind::Shm), "{fault:?}");
        let t = Instant::now();
        let err = c.forward(layer, &hidden, &r).unwrap_err().to_string();
        assert!(err.contains(what), "{fault:?}: {err}");
        assert!(t.elapsed() < Duration::from_secs(3), "{fault:?} took {:?}", t.elapsed());
        // The ring is given up (a timed-out slot is only parked); calls continue over gRPC.
        let t = Instant::now();
        let out = c.forward(layer, &hidden, &r);
        match fault {
            Fault::Silent => {
                // Still the ring (a slow server is not a broken one): another bounded error.
                let err = out.unwrap_err().to_string();
                assert!(err.contains("did not answer"), "{err}");
                assert!(t.elapsed() < Duration::from_secs(3));
            }
            _ => {
                assert!(out.is_ok(), "{fault:?}: {out:?}");
                assert_eq!(c.transport(), Some(LinkKind::Grpc), "{fault:?}");
            }
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        drop(c);
        rt.shutdown_background();
    }
}
