//! Names that leave the process, in one place (STYLE.md): Prometheus metric names, gRPC
//! metadata keys and HTTP headers. Environment variable names of the flags are in the
//! `kt-gateway` binary (`services/gateway/src/main.rs`).

/// Prometheus metric names (`_total` for counters, `_seconds` for durations).
pub mod metrics {
    /// Counter, labels `route` (the matched route, or `unmatched`) and `status` (HTTP code).
    pub const REQUESTS_TOTAL: &str = "kt_gateway_requests_total";
    /// Histogram: request arrival to the first generated token's text leaving the gateway.
    pub const TIME_TO_FIRST_TOKEN_SECONDS: &str = "kt_gateway_time_to_first_token_seconds";
    /// Histogram: time between consecutive generated tokens of one sequence.
    pub const TIME_PER_OUTPUT_TOKEN_SECONDS: &str = "kt_gateway_time_per_output_token_seconds";
    /// Histogram: whole generation request, arrival to the last event.
    pub const REQUEST_DURATION_SECONDS: &str = "kt_gateway_request_duration_seconds";
    /// Gauge: requests waiting for admission.
    pub const QUEUE_DEPTH: &str = "kt_gateway_queue_depth";
    /// Gauge: admitted generations (sequences on workers).
    pub const RUNNING: &str = "kt_gateway_running_sequences";
    /// Counter: prompt tokens sent to workers.
    pub const PROMPT_TOKENS_TOTAL: &str = "kt_gateway_prompt_tokens_total";
    /// Counter: generated tokens received from workers.
    pub const COMPLETION_TOKENS_TOTAL: &str = "kt_gateway_completion_tokens_total";
    /// Counter, label `reason`: requests refused by admission (`queue_full`, `queue_timeout`,
    /// `no_worker`).
    pub const REJECTED_TOTAL: &str = "kt_gateway_rejected_total";
    /// Gauge, label `worker`: 1 while the worker passes health checks, else 0.
    pub const WORKER_HEALTHY: &str = "kt_gateway_worker_healthy";
    /// Gauge, label `worker`: tokens the gateway expects the worker still to process
    /// (prompt + remaining budget of its live sequences).
    pub const WORKER_OUTSTANDING_TOKENS: &str = "kt_gateway_worker_outstanding_tokens";
    /// Counter, label `worker`: generations routed to the worker.
    pub const WORKER_REQUESTS_TOTAL: &str = "kt_gateway_worker_requests_total";
    /// Gauge, label `worker`: free KV-cache blocks the worker last reported.
    pub const WORKER_KV_BLOCKS_FREE: &str = "kt_gateway_worker_kv_blocks_free";
}

/// gRPC metadata keys the gateway sends with `Generate` and `Cancel`.
pub mod grpc {
    /// W3C trace context of the HTTP request (passed through, or started by the gateway).
    pub const TRACEPARENT: &str = "traceparent";
    /// The gateway's id of the HTTP request (also the `x-request-id` response header).
    pub const REQUEST_ID: &str = "x-request-id";
}

/// HTTP headers the gateway reads or writes.
pub mod http {
    pub const TRACEPARENT: &str = "traceparent";
    pub const REQUEST_ID: &str = "x-request-id";
    pub const RETRY_AFTER: &str = "retry-after";
    pub const X_API_KEY: &str = "x-api-key";
}
