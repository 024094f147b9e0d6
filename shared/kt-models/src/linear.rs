//! Matrix products against weights in any supported block format.

use kt_core::WeightTensor;
use kt_quant::Kernels;
use rayon::prelude::*;

use crate::ModelError;

/// How activations meet quantized weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum MatmulMode {
    /// Weights dequantized block by block and dotted with f32 activations: the exact reference.
    #[default]
    F32,
    /// As ggml's CPU backend does on x86: activations converted to the weight format's
    /// `vec_dot_type` (f16 for F16, Q8_0 for Q4_0/Q8_0, Q8_K for K-quants, ...) with ggml's
    /// x86 quantizers and dotted with integer arithmetic. Reproduces llama.cpp's rounding, for
    /// comparing against it.
    Ggml,
}

/// `y = x W^T (+ b)` with `W` of shape `[out, in]` in its stored format.
#[derive(Clone, Debug)]
pub struct Linear {
    w: WeightTensor,
    bias: Option<Vec<f32>>,
    kernels: &'static Kernels,
    /// In `MatmulMode::Ggml`: the activation quantizer ggml uses on x86, and its row size.
    act: Option<kt_quant::kernels::QuantizeFn>,
    act_row_bytes: usize,
}

/// Rows handed to one rayon task: enough work to amortize scheduling.
const ROWS_PER_TASK: usize = 16;

impl Linear {
    pub fn new(
        w: WeightTensor,
        bias: Option<Vec<f32>>,
        mode: MatmulMode,
    ) -> Result<Self, ModelError> {
        if w.shape.len() != 2 {
            return Err(ModelError::Shape(format!(
                "`{}` has shape {:?}, a matrix was expected",
                w.name, w.shape
            )));
        }
        let kernels = kt_quant::kernels(w.ty).ok_or_else(|| {
            ModelError::Unsupported(format!(
                "`{}` is stored as {}, which kt cannot compute",
                w.name, w.ty
            ))
        })?;
        if let Some(b) = &bias {
            if b.len() != w.shape[0] {
                return Err(ModelError::Shape(format!(
                    "bias of `{}` has {} values for {} outputs",
                    w.name,
                    b.len(),
                    w.shape[0]
                )));
            }
        }
        let (act, act_row_bytes) = match mode {
            MatmulMode::F32 => (None, 0),
            MatmulMode::Ggml => {
                let vt = kernels.vec_dot_type;
                let act = kt_quant::ggml_x86_quantize(vt).ok_or_else(|| {
                    ModelError::Unsupported(format!("no kernels for activations in {vt}"))
                })?;
                let qrb = vt.row_bytes(w.shape[1]).ok_or_else(|| {
                    ModelError::Shape(format!(
                        "`{}`: rows of {} do not split into {vt} blocks",
                        w.name, w.shape[1]
                    ))
                })?;
                (Some(act), qrb)
            }
        };
        Ok(Self { w, bias, kernels, act, act_row_bytes })
    }

    pub fn in_dim(&self) -> usize {
        self.w.shape[1]
    }

    pub fn out_dim(&self) -> usize {
        self.w.shape[0]
    }

    pub fn weight(&self) -> &WeightTensor {
        &self.w
    }

    /// The kernels of the weight format (chosen at run time).
    pub fn kernels(&self) -> &'static Kernels {
        self.kernels
    }

    /// In `MatmulMode::Ggml`: the activation quantizer and the bytes of one quantized input
    /// row; `None` in `MatmulMode::F32`.
    pub fn act_quantizer(&self) -> Option<(kt_quant::kernels::QuantizeFn, usize)> {
        self.act.map(|q| (q, self.act_row_bytes))
    }

    pub fn bias(&self) -> Option<&[f32]> {
        self.bias.as_deref()
    }

    /// `x` holds `n` rows of `in_dim`; returns `n` rows of `out_dim`.
    pub fn forward(&self, x: &[f32], n: usize) -> Vec<f32> {
        let (d_in, d_out) = (self.in_dim(), self.out_dim());
        debug_assert_eq!(x.len(), n * d_in);
        let rb = self.w.row_bytes();
        let data: &[u8] = &self.w.data;
        // Quantize the activations once per call when mirroring ggml.
        let qx: Option<(Vec<u8>, usize)> = self.act.map(|act| {
            let qrb = self.act_row_bytes;
            let mut q = vec![0u8; qrb * n];
            for (row, out) in x.chunks_exact(d_in).zip(q.chunks_exact_mut(qrb)) {
                act(row, out);
            }
            (q, qrb)
        });
        let dot = |r: usize, t: usize| -> f32 {
            let w = &data[r * rb..(r + 1) * rb];
            match &qx {
                None => (self.kernels.dot_f32)(w, &x[t * d_in..(t + 1) * d_in]),
                Some((q, qrb)) => (self.kernels.vec_dot)(w, &q[t * qrb..(t + 1) * qrb]),
            }
        };
        // Rows outermost so that each weight row is streamed once for all tokens.
        let mut yt = vec![0f32; d_out * n];
        yt.par_chunks_mut(n * ROWS_PER_TASK).enumerate().for_each(|(c, chunk)| {
            for (i, row_out) in chunk.chunks_exact_mut(n).enumerate() {
                let r = c * ROWS_PER_TASK + i;
                for (t, y) in row_out.iter_mut().enumerate() {
                    *y = dot(r, t);
                }
            }
        });
        let mut y = if n == 1 {
            yt
        } else {
            let mut y = vec![0f32; n * d_out];
            for r in 0..d_out {
                for t in 0..n {
                    y[t * d_out + r] = yt[r * n + t];
                }
            }
            y
        };
        if let Some(b) = &self.bias {
            for row in y.chunks_exact_mut(d_out) {
                for (v, b) in row.iter_mut().zip(b) {
                    *v += b;
                }
            }
        }
        y
    }
}

/// A whole tensor as f32 values (for norms, biases, embeddings rows and small matrices).
pub fn to_f32(w: &WeightTensor) -> Result<Vec<f32>, ModelError> {
    kt_quant::dequantize(w.ty, &w.data, w.numel())
        .map_err(|e| ModelError::Unsupported(format!("`{}`: {e}", w.name)))
}

/// One row of a 2-D tensor as f32 values (an embedding lookup).
pub fn row_f32(w: &WeightTensor, i: usize, out: &mut [f32]) -> Result<(), ModelError> {
    let row = w
        .row(i)
        .ok_or_else(|| ModelError::Input(format!("token id {i} is outside the vocabulary")))?;
    kt_quant::dequantize_row(w.ty, row, out)
        .map_err(|e| ModelError::Unsupported(format!("`{}`: {e}", w.name)))
}
