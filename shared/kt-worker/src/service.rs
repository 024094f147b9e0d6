//! `kt.v1.Worker` over an [`Engine`]: request checks, event streams, `Info` and `Health`.

use std::pin::Pin;

use kt_expert::TierHealth;
use kt_proto::v1::health_response::Status as Serving;
use kt_proto::v1::worker_server::{Worker, WorkerServer};
use kt_proto::v1::{
    generate_event, CancelRequest, CancelResponse, FinishReason as WireFinish, FinishedEvent,
    GenerateEvent, GenerateRequest, HealthRequest, HealthResponse, TokenEvent,
    TokenLogprob as WireLogprob, WorkerInfo, WorkerInfoRequest,
};
use kt_sample::SamplingParams;
use tokio::net::TcpListener;
use tokio_stream::wrappers::{TcpListenerStream, UnboundedReceiverStream};
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status};

use crate::engine::{self, Engine, Event, FinishReason};

/// The `kt.v1.Worker` service; cheap to clone.
#[derive(Clone, Debug)]
pub struct WorkerService {
    engine: Engine,
    /// Model name reported by `Info`.
    name: String,
    config_hash: u64,
    /// The expert servers the model calls, when it does.
    experts: Option<TierHealth>,
}

impl WorkerService {
    /// Serves `engine`, naming the model `model_name` in `Info`.
    pub fn new(engine: Engine, model_name: &str) -> Self {
        let config_hash = kt_expert::config_hash(&engine.model().config);
        Self { engine, name: model_name.to_string(), config_hash, experts: None }
    }

    /// `Health` also asks the expert tier ([`crate::setup::WorkerModel::experts_health`]):
    /// not serving while a server the model needs is down and none of its replicas is up.
    pub fn with_expert_health(mut self, experts: Option<TierHealth>) -> Self {
        self.experts = experts;
        self
    }

    /// What `Health` answers: serving, unless the expert tier cannot answer for some share
    /// (the message names the servers); serving with a message while a replica stands in.
    pub fn health_status(&self) -> HealthResponse {
        match self.experts.as_ref().map(TierHealth::check) {
            Some(s) if !s.serving => {
                HealthResponse { status: Serving::NotServing as i32, message: s.message }
            }
            Some(s) => HealthResponse { status: Serving::Serving as i32, message: s.message },
            None => HealthResponse { status: Serving::Serving as i32, message: String::new() },
        }
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The tonic server wrapper (for `Server::add_service` or an in-process channel).
    pub fn into_server(self) -> WorkerServer<Self> {
        WorkerServer::new(self)
    }

    /// What `Info` answers.
    pub fn info(&self) -> WorkerInfo {
        let m = self.engine.model();
        let st = self.engine.stats();
        let u32_of = |v: usize| u32::try_from(v).unwrap_or(u32::MAX);
        WorkerInfo {
            model: self.name.clone(),
            arch: m.config.arch.name().to_string(),
            config_hash: self.config_hash,
            max_context: u32_of(m.config.max_position),
            kv_blocks_free: u32_of(st.free_blocks),
            kv_blocks_total: u32_of(st.total_blocks),
            kv_block_tokens: u32_of(m.block_tokens),
            max_batch: u32_of(self.engine.options().max_batch),
            running: u32_of(st.running),
            waiting: u32_of(st.waiting),
            experts_per_token: u32_of(m.experts_per_token),
            devices: m.devices.clone(),
        }
    }
}

/// The engine request a wire request asks for (sampling defaults as the proto documents).
pub fn engine_request(r: GenerateRequest) -> engine::Request {
    let s = r.sampling.unwrap_or_default();
    let sampling = SamplingParams {
        temperature: s.temperature,
        top_k: s.top_k as usize,
        top_p: s.top_p.unwrap_or(1.0),
        min_p: s.min_p,
        repetition_penalty: s.repetition_penalty.unwrap_or(1.0),
        presence_penalty: s.presence_penalty,
        frequency_penalty: s.frequency_penalty,
        penalty_window: s.penalty_window.map(|w| w as usize),
        logit_bias: s.logit_bias.into_iter().collect(),
        seed: s.seed,
        ..SamplingParams::default()
    };
    engine::Request {
        id: r.request_id,
        prompt: r.prompt_tokens,
        sampling,
        max_tokens: r.max_tokens as usize,
        stop_ids: r.stop_token_ids,
        top_logprobs: r.top_logprobs as usize,
    }
}

/// The wire form of an engine event.
pub fn wire_event(e: Event) -> GenerateEvent {
    let lp = |t: kt_sample::TokenLogprob| WireLogprob { id: t.id, logprob: t.logprob };
    let event = match e {
        Event::Token(t) => generate_event::Event::Token(TokenEvent {
            index: u32::try_from(t.index).unwrap_or(u32::MAX),
            token: Some(WireLogprob { id: t.id, logprob: t.logprob }),
            top_logprobs: t.top_logprobs.into_iter().map(lp).collect(),
        }),
        Event::Finished(f) => generate_event::Event::Finished(FinishedEvent {
            reason: match f.reason {
                FinishReason::Stop => WireFinish::Stop,
                FinishReason::Length => WireFinish::Length,
                FinishReason::Cancelled => WireFinish::Cancelled,
                FinishReason::Error => WireFinish::Error,
            } as i32,
            prompt_tokens: u32::try_from(f.prompt_tokens).unwrap_or(u32::MAX),
            completion_tokens: u32::try_from(f.completion_tokens).unwrap_or(u32::MAX),
            message: f.message,
        }),
    };
    GenerateEvent { event: Some(event) }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<GenerateEvent, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl Worker for WorkerService {
    type GenerateStream = EventStream;

    async fn generate(
        &self,
        request: Request<GenerateRequest>,
    ) -> Result<Response<Self::GenerateStream>, Status> {
        let req = engine_request(request.into_inner());
        let id = req.id.clone();
        let events = self.engine.submit(req).map_err(|e| match e {
            engine::SubmitError::ShuttingDown => Status::unavailable(e.to_string()),
            other => Status::invalid_argument(other.to_string()),
        })?;
        tracing::debug!(%id, "generate");
        // Dropping this stream (the client went away) drops the receiver, which the
        // scheduler sees as a cancellation.
        let stream = UnboundedReceiverStream::new(events).map(|e| Ok(wire_event(e)));
        Ok(Response::new(Box::pin(stream)))
    }

    async fn cancel(
        &self,
        request: Request<CancelRequest>,
    ) -> Result<Response<CancelResponse>, Status> {
        let found = self.engine.cancel(&request.into_inner().request_id);
        Ok(Response::new(CancelResponse { found }))
    }

    async fn info(&self, _: Request<WorkerInfoRequest>) -> Result<Response<WorkerInfo>, Status> {
        Ok(Response::new(self.info()))
    }

    async fn health(&self, _: Request<HealthRequest>) -> Result<Response<HealthResponse>, Status> {
        let h = self.health_status();
        if h.status != Serving::Serving as i32 {
            tracing::debug!(reason = %h.message, "health: not serving");
        }
        Ok(Response::new(h))
    }
}

/// Serves `service` on `listener` until `shutdown` resolves.
pub async fn serve(
    service: WorkerService,
    listener: TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    tonic::transport::Server::builder()
        .add_service(service.into_server())
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
        .await
}
