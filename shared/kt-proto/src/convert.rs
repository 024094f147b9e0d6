//! Wire messages ↔ kt types, with validation of everything a peer can get wrong.

use kt_models::{Routing, NO_EXPERT};

use crate::v1::{tensor::Payload, DataType, ExpertRequest, Tensor};
use crate::values;
pub use crate::values::bf16_bits;

/// A malformed or unacceptable message. The text names the field and what is wrong.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum WireError {
    #[error("`{field}`: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error("`{field}`: {reason}")]
    TooLarge { field: &'static str, reason: String },
    #[error("`{field}`: {reason}")]
    Unsupported { field: &'static str, reason: String },
}

fn invalid(field: &'static str, reason: impl Into<String>) -> WireError {
    WireError::Invalid { field, reason: reason.into() }
}

/// Size limits a receiver enforces before allocating anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most tokens (rows) per request.
    pub max_tokens: usize,
    /// Largest encoded message, in bytes (also the gRPC decoding limit).
    pub max_message_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        // 8192 tokens × hidden 7168 × 4 bytes is 224 MiB; 256 MiB leaves room for the ids.
        Self { max_tokens: 8192, max_message_bytes: 256 << 20 }
    }
}

/// Element types kt sends activations in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WireDType {
    F32,
    Bf16,
}

impl WireDType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            WireDType::F32 => 4,
            WireDType::Bf16 => 2,
        }
    }

    /// The wire enum value.
    pub fn to_proto(self) -> DataType {
        match self {
            WireDType::F32 => DataType::F32,
            WireDType::Bf16 => DataType::Bf16,
        }
    }

    /// From the wire enum value (F32 or BF16; anything else is an error naming it).
    pub fn from_proto(raw: i32) -> Result<Self, WireError> {
        match DataType::try_from(raw) {
            Ok(DataType::F32) => Ok(WireDType::F32),
            Ok(DataType::Bf16) => Ok(WireDType::Bf16),
            Ok(other) => Err(WireError::Unsupported {
                field: "dtype",
                reason: format!(
                    "{} is not an activation type here (F32 or BF16)",
                    other.as_str_name()
                ),
            }),
            Err(_) => Err(invalid("dtype", format!("unknown dtype {raw}"))),
        }
    }
}

/// A tensor of `values` (row-major, `shape`) in `dtype` with an inline payload.
pub fn encode_tensor_f32(values: &[f32], shape: &[usize], dtype: WireDType) -> Tensor {
    let mut bytes = vec![0u8; values.len() * dtype.size()];
    write_values(values, dtype, &mut bytes);
    Tensor {
        shape: shape.iter().map(|&d| d as u64).collect(),
        dtype: dtype.to_proto() as i32,
        payload: Some(Payload::Inline(bytes)),
    }
}

/// Writes `values` into `out` (exactly `values.len() × dtype.size()` bytes) as little-endian
/// `dtype` elements. Extra bytes of `out` are left alone; a short `out` takes what fits.
pub fn write_values(values: &[f32], dtype: WireDType, out: &mut [u8]) {
    match dtype {
        WireDType::F32 => {
            let src = values::f32_bytes(values);
            let n = src.len().min(out.len());
            out[..n].copy_from_slice(&src[..n]);
        }
        WireDType::Bf16 => values::to_bf16_bytes(values, out),
    }
}

/// The f32 values of little-endian `dtype` elements (`bytes.len()` must be a multiple of the
/// element size; a trailing partial element is ignored).
pub fn read_values(bytes: &[u8], dtype: WireDType) -> Vec<f32> {
    let count = bytes.len() / dtype.size();
    match dtype {
        WireDType::F32 => {
            let mut out = vec![0.0f32; count];
            values::f32_bytes_mut(&mut out).copy_from_slice(&bytes[..count * 4]);
            out
        }
        WireDType::Bf16 => {
            let mut out = Vec::new();
            values::extend_from_bf16_bytes(&mut out, bytes);
            out
        }
    }
}

/// The values of an inline F32 or BF16 tensor as f32, with its shape and dtype. At most
/// `max_elems` elements are accepted.
pub fn decode_tensor_f32(
    t: &Tensor,
    max_elems: usize,
) -> Result<(Vec<f32>, Vec<usize>, WireDType), WireError> {
    let dtype = WireDType::from_proto(t.dtype)?;
    let mut elems: usize = 1;
    let mut shape = Vec::with_capacity(t.shape.len().min(8));
    if t.shape.len() > 8 {
        return Err(invalid("shape", format!("{} dimensions (at most 8)", t.shape.len())));
    }
    for &d in &t.shape {
        let d = usize::try_from(d)
            .map_err(|_| invalid("shape", format!("dimension {d} is too large")))?;
        elems = elems.checked_mul(d).filter(|&e| e <= max_elems).ok_or_else(|| {
            WireError::TooLarge {
                field: "shape",
                reason: format!("{:?} has more than {max_elems} elements", t.shape),
            }
        })?;
        shape.push(d);
    }
    let bytes = match &t.payload {
        Some(Payload::Inline(b)) => b,
        Some(Payload::Shm(_)) => {
            return Err(WireError::Unsupported {
                field: "payload",
                reason: "shared-memory payloads are not accepted on this transport".into(),
            })
        }
        None if elems == 0 => return Ok((Vec::new(), shape, dtype)),
        None => return Err(invalid("payload", "missing")),
    };
    if bytes.len() != elems * dtype.size() {
        return Err(invalid(
            "payload",
            format!(
                "{} bytes for shape {:?} of {dtype:?} ({} expected)",
                bytes.len(),
                t.shape,
                elems * dtype.size()
            ),
        ));
    }
    Ok((read_values(bytes, dtype), shape, dtype))
}

/// What a model looks like from the expert seam: the ranges a request is checked against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeamShape {
    pub hidden: usize,
    pub n_layers: usize,
    pub n_experts: usize,
}

/// A validated `ExpertRequest`.
#[derive(Debug, Clone, PartialEq)]
pub struct ExpertCall {
    pub request_id: u64,
    pub layer: usize,
    /// `[n × hidden]` as f32 (converted from the wire dtype).
    pub hidden: Vec<f32>,
    /// Tokens.
    pub n: usize,
    /// The dtype the hidden states came in (the answer goes back in it).
    pub dtype: WireDType,
    pub routing: Routing,
}

/// Builds the wire request of one expert-seam call.
pub fn encode_request(
    request_id: u64,
    layer: usize,
    hidden: &[f32],
    hidden_size: usize,
    routing: &Routing,
    dtype: WireDType,
) -> ExpertRequest {
    let n = hidden.len().checked_div(hidden_size).unwrap_or(0);
    ExpertRequest {
        request_id,
        layer: layer as u32,
        hidden: Some(encode_tensor_f32(hidden, &[n, hidden_size], dtype)),
        k: routing.k as u32,
        expert_ids: routing.ids.clone(),
        expert_weights: routing.weights.clone(),
    }
}

/// Checks an `ExpertRequest` against the model's shape and `limits` and converts it.
pub fn decode_request(
    req: &ExpertRequest,
    shape: &SeamShape,
    limits: &Limits,
) -> Result<ExpertCall, WireError> {
    let layer = check_layer(req.layer, shape)?;
    let t = req.hidden.as_ref().ok_or_else(|| invalid("hidden", "missing"))?;
    let max_elems = limits.max_tokens.saturating_mul(shape.hidden);
    let (hidden, dims, dtype) = decode_tensor_f32(t, max_elems).map_err(|e| match e {
        WireError::Invalid { field: "payload", reason } => invalid("hidden.payload", reason),
        other => other,
    })?;
    let n = match dims[..] {
        [n, h] if h == shape.hidden => n,
        _ => {
            return Err(invalid(
                "hidden.shape",
                format!("{dims:?}, [n, {}] was expected", shape.hidden),
            ))
        }
    };
    let k = check_k(req.k, n, shape)?;
    finish_call(
        CallParts {
            request_id: req.request_id,
            layer,
            n,
            k,
            dtype,
            hidden,
            hidden_finite: false,
            ids: req.expert_ids.clone(),
            weights: req.expert_weights.clone(),
        },
        shape,
    )
}

/// The layer index of a request, checked against the model.
pub fn check_layer(layer: u32, shape: &SeamShape) -> Result<usize, WireError> {
    let layer = layer as usize;
    if layer >= shape.n_layers {
        return Err(invalid(
            "layer",
            format!("{layer} is out of range (the model has {} layers)", shape.n_layers),
        ));
    }
    Ok(layer)
}

/// `k` of a request of `n` tokens, checked (`n` ≥ 1 is checked here too).
pub fn check_k(k: u32, n: usize, shape: &SeamShape) -> Result<usize, WireError> {
    if n == 0 {
        return Err(invalid("hidden.shape", "no tokens"));
    }
    let k = k as usize;
    if k == 0 || k > shape.n_experts {
        return Err(invalid("k", format!("{k} is out of range 1..={}", shape.n_experts)));
    }
    Ok(k)
}

/// The parts of a call as a transport read them, before the checks that do not depend on the
/// transport (lengths of ids and weights, id range, finite values).
#[derive(Debug, Clone, PartialEq)]
pub struct CallParts {
    pub request_id: u64,
    /// Checked with [`check_layer`].
    pub layer: usize,
    /// Tokens, ≥ 1; `hidden` must hold `n × shape.hidden` values (checked again here).
    pub n: usize,
    /// Checked with [`check_k`].
    pub k: usize,
    pub dtype: WireDType,
    pub hidden: Vec<f32>,
    /// Whether the decoder already found every `hidden` value finite (bf16 decoding checks
    /// as it converts); otherwise [`finish_call`] checks.
    pub hidden_finite: bool,
    pub ids: Vec<u32>,
    pub weights: Vec<f32>,
}

/// The transport-independent checks of a call; the answer is the validated [`ExpertCall`].
pub fn finish_call(p: CallParts, shape: &SeamShape) -> Result<ExpertCall, WireError> {
    let CallParts { request_id, layer, n, k, dtype, hidden, hidden_finite, ids, weights } = p;
    if hidden.len() != n.saturating_mul(shape.hidden) {
        return Err(invalid(
            "hidden",
            format!("{} values for {n} tokens of hidden {}", hidden.len(), shape.hidden),
        ));
    }
    let slots = n * k;
    if ids.len() != slots {
        return Err(invalid(
            "expert_ids",
            format!("{} ids for {n} tokens of top-{k} ({slots} expected)", ids.len()),
        ));
    }
    if weights.len() != slots {
        return Err(invalid(
            "expert_weights",
            format!("{} weights for {n} tokens of top-{k} ({slots} expected)", weights.len()),
        ));
    }
    if let Some(&id) = ids.iter().find(|&&id| id != NO_EXPERT && id as usize >= shape.n_experts) {
        return Err(invalid(
            "expert_ids",
            format!("expert {id} is out of range (the model has {} experts)", shape.n_experts),
        ));
    }
    if let Some(w) = values::first_non_finite(&weights) {
        return Err(invalid("expert_weights", format!("{w} is not finite")));
    }
    if !hidden_finite {
        if let Some(v) = values::first_non_finite(&hidden) {
            return Err(invalid("hidden", format!("{v} is not finite")));
        }
    }
    Ok(ExpertCall { request_id, layer, hidden, n, dtype, routing: Routing { k, ids, weights } })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::v1::ShmHandle;

    const SHAPE: SeamShape = SeamShape { hidden: 4, n_layers: 3, n_experts: 8 };

    fn good() -> ExpertRequest {
        let routing =
            Routing { k: 2, ids: vec![0, 5, 7, NO_EXPERT], weights: vec![0.5, 0.5, 1.0, 0.0] };
        let hidden: Vec<f32> = (0..8).map(|i| i as f32 * 0.25).collect();
        encode_request(42, 1, &hidden, 4, &routing, WireDType::F32)
    }

    fn err(req: &ExpertRequest) -> WireError {
        decode_request(req, &SHAPE, &Limits::default()).unwrap_err()
    }

    #[test]
    fn round_trip_f32_and_bf16() {
        let call = decode_request(&good(), &SHAPE, &Limits::default()).unwrap();
        assert_eq!((call.request_id, call.layer, call.n, call.dtype), (42, 1, 2, WireDType::F32));
        assert_eq!(call.hidden[5], 1.25);
        assert_eq!(call.routing.ids, vec![0, 5, 7, NO_EXPERT]);
        let mut req = good();
        req.hidden = Some(encode_tensor_f32(&call.hidden, &[2, 4], WireDType::Bf16));
        let call = decode_request(&req, &SHAPE, &Limits::default()).unwrap();
        assert_eq!(call.dtype, WireDType::Bf16);
        assert_eq!(call.hidden[5], 1.25); // exactly representable in bf16
    }

    #[test]
    fn payload_length_must_match_shape() {
        let mut req = good();
        if let Some(Payload::Inline(b)) = req.hidden.as_mut().and_then(|t| t.payload.as_mut()) {
            b.pop();
        }
        assert!(err(&req).to_string().contains("hidden.payload"), "{}", err(&req));
        let mut req = good();
        req.hidden.as_mut().unwrap().shape = vec![3, 4];
        assert!(matches!(err(&req), WireError::Invalid { field: "hidden.payload", .. }));
    }

    #[test]
    fn hostile_shapes_are_rejected_before_allocation() {
        let mut req = good();
        req.hidden.as_mut().unwrap().shape = vec![u64::MAX, u64::MAX];
        assert!(matches!(err(&req), WireError::TooLarge { .. } | WireError::Invalid { .. }));
        req.hidden.as_mut().unwrap().shape = vec![1 << 40, 4];
        assert!(matches!(err(&req), WireError::TooLarge { .. }));
        req.hidden.as_mut().unwrap().shape = vec![1; 100];
        assert!(matches!(err(&req), WireError::Invalid { field: "shape", .. }));
        req.hidden.as_mut().unwrap().shape = vec![2, 3];
        req.hidden.as_mut().unwrap().payload = Some(Payload::Inline(vec![0; 24]));
        assert!(matches!(err(&req), WireError::Invalid { field: "hidden.shape", .. }));
        req.hidden.as_mut().unwrap().shape = vec![0, 4];
        req.hidden.as_mut().unwrap().payload = None;
        assert!(matches!(err(&req), WireError::Invalid { field: "hidden.shape", .. }));
    }

    #[test]
    fn dtype_must_be_known_and_an_activation_type() {
        let mut req = good();
        req.hidden.as_mut().unwrap().dtype = 99;
        assert!(matches!(err(&req), WireError::Invalid { field: "dtype", .. }));
        req.hidden.as_mut().unwrap().dtype = 0;
        assert!(matches!(err(&req), WireError::Unsupported { field: "dtype", .. }));
        req.hidden.as_mut().unwrap().dtype = DataType::U32 as i32;
        assert!(matches!(err(&req), WireError::Unsupported { field: "dtype", .. }));
    }

    #[test]
    fn routing_is_checked() {
        let mut req = good();
        req.expert_ids[1] = 8;
        assert!(matches!(err(&req), WireError::Invalid { field: "expert_ids", .. }));
        let mut req = good();
        req.expert_ids.pop();
        assert!(matches!(err(&req), WireError::Invalid { field: "expert_ids", .. }));
        let mut req = good();
        req.expert_weights.push(1.0);
        assert!(matches!(err(&req), WireError::Invalid { field: "expert_weights", .. }));
        let mut req = good();
        req.expert_weights[0] = f32::NAN;
        assert!(matches!(err(&req), WireError::Invalid { field: "expert_weights", .. }));
        let mut req = good();
        req.k = 0;
        assert!(matches!(err(&req), WireError::Invalid { field: "k", .. }));
        req.k = 9;
        assert!(matches!(err(&req), WireError::Invalid { field: "k", .. }));
        let mut req = good();
        req.k = 4; // consistent with neither the ids nor the weights
        assert!(matches!(err(&req), WireError::Invalid { field: "expert_ids", .. }));
    }

    #[test]
    fn layer_and_missing_parts() {
        let mut req = good();
        req.layer = 3;
        assert!(matches!(err(&req), WireError::Invalid { field: "layer", .. }));
        let mut req = good();
        req.hidden = None;
        assert!(matches!(err(&req), WireError::Invalid { field: "hidden", .. }));
        let mut req = good();
        req.hidden.as_mut().unwrap().payload = None;
        assert!(matches!(err(&req), WireError::Invalid { field: "hidden.payload", .. }));
        let mut req = good();
        req.hidden.as_mut().unwrap().payload =
            Some(Payload::Shm(ShmHandle { name: "x".into(), offset: 0, len: 32 }));
        assert!(matches!(err(&req), WireError::Unsupported { field: "payload", .. }));
    }

    #[test]
    fn bf16_rounding_matches_half() {
        let mut x = 0x1234_5678u32;
        let mut vals = vec![0.0f32, -0.0, 1.0, f32::MAX, f32::MIN_POSITIVE, f32::INFINITY, 1e-40];
        for _ in 0..100_000 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            let v = f32::from_bits(x);
            if !v.is_nan() {
                vals.push(v);
            }
        }
        for v in vals {
            assert_eq!(bf16_bits(v), half::bf16::from_f32(v).to_bits(), "{v:e}");
        }
        assert!(half::bf16::from_bits(bf16_bits(f32::NAN)).is_nan());
    }

    #[test]
    fn token_limit() {
        let limits = Limits { max_tokens: 1, max_message_bytes: 1 << 20 };
        assert!(matches!(
            decode_request(&good(), &SHAPE, &limits).unwrap_err(),
            WireError::TooLarge { .. }
        ));
    }
}
