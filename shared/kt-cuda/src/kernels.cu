// kt's CUDA kernels, compiled with NVRTC when a CudaModel is created (no nvcc at build time).
// Every kernel works on f32 activations; weights for the GEMMs go through cuBLAS.
// Conventions: row-major, `rows` independent rows; pointers are device addresses.

#define INFINITY __int_as_float(0x7f800000)

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, o));
    return v;
}

// Sum over the block; every thread gets the result. `scratch` holds 32 floats.
__device__ float block_sum(float v, float* scratch) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    int warps = (blockDim.x + 31) >> 5;
    v = (threadIdx.x < warps) ? scratch[threadIdx.x] : 0.0f;
    if (warp == 0) v = warp_sum(v);
    if (threadIdx.x == 0) scratch[0] = v;
    __syncthreads();
    v = scratch[0];
    __syncthreads();
    return v;
}

__device__ float block_max(float v, float* scratch) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    int warps = (blockDim.x + 31) >> 5;
    v = (threadIdx.x < warps) ? scratch[threadIdx.x] : -INFINITY;
    if (warp == 0) v = warp_max(v);
    if (threadIdx.x == 0) scratch[0] = v;
    __syncthreads();
    v = scratch[0];
    __syncthreads();
    return v;
}

// y[row][0..d] = w * x[row][0..d] / rms(x[row][0..d]); rows are `in_stride` / `out_stride`
// apart (in place allowed). One block per row.
extern "C" __global__ void rms_norm(const float* x, int in_stride, float* y, int out_stride,
                                    const float* w, int d, float eps) {
    __shared__ float scratch[32];
    const float* xr = x + (size_t)blockIdx.x * in_stride;
    float* yr = y + (size_t)blockIdx.x * out_stride;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < d; i += blockDim.x) ss += xr[i] * xr[i];
    ss = block_sum(ss, scratch);
    float inv = 1.0f / sqrtf(ss / (float)d + eps);
    for (int i = threadIdx.x; i < d; i += blockDim.x) yr[i] = w[i] * (xr[i] * inv);
}

// Rotates `heads` head vectors of each row in place: head h of row r starts at
// x + r * row_stride + h * head_stride + offset. cos/sin are [position][pairs].
// One block per (row, head), threads over pairs.
extern "C" __global__ void rope(float* x, int heads, int row_stride, int head_stride,
                                int offset, const int* positions, const float* cos_t,
                                const float* sin_t, int pairs, int interleaved) {
    int row = blockIdx.x / heads, head = blockIdx.x % heads;
    float* v = x + (size_t)row * row_stride + (size_t)head * head_stride + offset;
    const float* c = cos_t + (size_t)positions[row] * pairs;
    const float* s = sin_t + (size_t)positions[row] * pairs;
    for (int i = threadIdx.x; i < pairs; i += blockDim.x) {
        int a = interleaved ? 2 * i : i;
        int b = interleaved ? 2 * i + 1 : i + pairs;
        float x0 = v[a], x1 = v[b];
        v[a] = x0 * c[i] - x1 * s[i];
        v[b] = x1 * c[i] + x0 * s[i];
    }
}

// KV cache elements: f32, or bf16 as raw 16-bit patterns (round to nearest even on write).
__device__ __forceinline__ float ld(const float* p) { return *p; }
__device__ __forceinline__ float ld(const unsigned short* p) {
    return __uint_as_float(((unsigned int)*p) << 16);
}
__device__ __forceinline__ void st(float* p, float v) { *p = v; }
__device__ __forceinline__ void st(unsigned short* p, float v) {
    unsigned int u = __float_as_uint(v);
    if ((u & 0x7fffffff) > 0x7f800000) {
        *p = (unsigned short)((u >> 16) | 0x40);
    } else {
        u += 0x7fff + ((u >> 16) & 1);
        *p = (unsigned short)(u >> 16);
    }
}

// cache[slot[r]][0..width] = src[r * src_stride + src_offset ..]; one block per row.
template <typename T>
__device__ void kv_write_t(const float* src, int src_stride, int src_offset, T* cache,
                           const int* slots, int width) {
    const float* s = src + (size_t)blockIdx.x * src_stride + src_offset;
    T* d = cache + (size_t)slots[blockIdx.x] * width;
    for (int i = threadIdx.x; i < width; i += blockDim.x) st(d + i, s[i]);
}
extern "C" __global__ void kv_write(const float* src, int src_stride, int src_offset,
                                    float* cache, const int* slots, int width) {
    kv_write_t(src, src_stride, src_offset, cache, slots, width);
}
extern "C" __global__ void kv_write_bf16(const float* src, int src_stride, int src_offset,
                                         unsigned short* cache, const int* slots, int width) {
    kv_write_t(src, src_stride, src_offset, cache, slots, width);
}

// out[r] = table[ids[r]] for rows of width d; one block per row.
extern "C" __global__ void gather_rows(const float* table, const int* ids, float* out, int d) {
    const float* s = table + (size_t)ids[blockIdx.x] * d;
    float* o = out + (size_t)blockIdx.x * d;
    for (int i = threadIdx.x; i < d; i += blockDim.x) o[i] = s[i];
}

extern "C" __global__ void silu_mul(float* g, const float* u, long n) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        float x = g[i];
        g[i] = x / (1.0f + expf(-x)) * u[i];
    }
}

extern "C" __global__ void add_inplace(float* x, const float* y, long n) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] += y[i];
}

// y[r][j] += b[j]
extern "C" __global__ void add_bias(float* y, const float* b, int d, long n) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] += b[i % d];
}

// x[r][..] *= sigmoid(g[r]) (Qwen2-MoE's shared-expert gate).
extern "C" __global__ void scale_rows_sigmoid(float* x, const float* g, int d, long n) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] *= 1.0f / (1.0f + expf(-g[i / d]));
}

// f32 -> bf16 (round to nearest even), as raw 16-bit patterns.
extern "C" __global__ void to_bf16(const float* x, unsigned short* y, long n) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        unsigned int u = __float_as_uint(x[i]);
        if ((u & 0x7fffffff) > 0x7f800000) {
            y[i] = (unsigned short)((u >> 16) | 0x40);
        } else {
            u += 0x7fff + ((u >> 16) & 1);
            y[i] = (unsigned short)(u >> 16);
        }
    }
}

// Paged attention, decode and prefill alike: one block per (row, head). Row `r` is the token
// at position positions[r] of sequence seqs[r], whose block table is
// tables[seqs[r] * table_stride ..]. It attends to positions 0..=positions[r] of its cache
// (causal), with score = (qa·ka + qb·kb) * scale and value va, online softmax over tiles.
//   GQA: qa = q (head_dim), no qb; ka = keys, va = values, kv head = head / group.
//   MLA: qa = k_b-absorbed query (kv_lora), qb = RoPE query; ka = va = latents, kb = RoPE keys.
// Caches are [slot][width]; a head's part starts at kv_head * *_head_off.
#define TILE 256
#define ATTEND_PARAMS(T)                                                                   \
    const float *qa, int qa_row, int qa_head, int da, const float *qb, int qb_row,         \
        int qb_head, int db, const T *ka, int ka_width, int ka_head_off, const T *kb,      \
        int kb_width, int kb_head_off, const T *va, int va_width, int va_head_off, int dv, \
        float *out, int out_row, int out_head, const int *positions, const int *seqs,      \
        const int *tables, int table_stride, int block_tokens, int n_heads, int group,     \
        float scale
#define ATTEND_ARGS                                                                        \
    qa, qa_row, qa_head, da, qb, qb_row, qb_head, db, ka, ka_width, ka_head_off, kb,       \
        kb_width, kb_head_off, va, va_width, va_head_off, dv, out, out_row, out_head,      \
        positions, seqs, tables, table_stride, block_tokens, n_heads, group, scale
template <typename T>
__device__ void attend_t(ATTEND_PARAMS(T)) {
    extern __shared__ float smem[];
    float* q = smem;                 // da + db
    float* sc = smem + da + db;      // TILE
    __shared__ float scratch[32];
    int row = blockIdx.x / n_heads, head = blockIdx.x % n_heads, kvh = head / group;
    int len = positions[row] + 1;
    const int* table = tables + (size_t)seqs[row] * table_stride;
    for (int i = threadIdx.x; i < da; i += blockDim.x)
        q[i] = qa[(size_t)row * qa_row + (size_t)head * qa_head + i];
    for (int i = threadIdx.x; i < db; i += blockDim.x)
        q[da + i] = qb[(size_t)row * qb_row + (size_t)head * qb_head + i];
    __syncthreads();
    // Each thread owns value dims threadIdx.x + k * blockDim.x.
    float acc[8];
    for (int k = 0; k < 8; k++) acc[k] = 0.0f;
    float m = -INFINITY, l = 0.0f;
    for (int start = 0; start < len; start += TILE) {
        int n = min(TILE, len - start);
        for (int j = threadIdx.x; j < n; j += blockDim.x) {
            int p = start + j;
            size_t slot = (size_t)table[p / block_tokens] * block_tokens + p % block_tokens;
            const T* kr = ka + slot * ka_width + (size_t)kvh * ka_head_off;
            float s = 0.0f;
            for (int i = 0; i < da; i++) s += q[i] * ld(kr + i);
            if (db > 0) {
                const T* kr2 = kb + slot * kb_width + (size_t)kvh * kb_head_off;
                float s2 = 0.0f;
                for (int i = 0; i < db; i++) s2 += q[da + i] * ld(kr2 + i);
                s += s2;
            }
            sc[j] = s * scale;
        }
        __syncthreads();
        float tmax = -INFINITY;
        for (int j = threadIdx.x; j < n; j += blockDim.x) tmax = fmaxf(tmax, sc[j]);
        tmax = block_max(tmax, scratch);
        float m_new = fmaxf(m, tmax);
        float corr = expf(m - m_new);
        float tsum = 0.0f;
        for (int j = threadIdx.x; j < n; j += blockDim.x) {
            float e = expf(sc[j] - m_new);
            sc[j] = e;
            tsum += e;
        }
        tsum = block_sum(tsum, scratch);
        l = l * corr + tsum;
        for (int k = 0; k < 8; k++) {
            int i = threadIdx.x + k * blockDim.x;
            if (i >= dv) break;
            float a = acc[k] * corr;
            for (int j = 0; j < n; j++) {
                int p = start + j;
                size_t slot = (size_t)table[p / block_tokens] * block_tokens + p % block_tokens;
                a += sc[j] * ld(va + slot * va_width + (size_t)kvh * va_head_off + i);
            }
            acc[k] = a;
        }
        m = m_new;
        __syncthreads();
    }
    float inv = 1.0f / l;
    for (int k = 0; k < 8; k++) {
        int i = threadIdx.x + k * blockDim.x;
        if (i >= dv) break;
        out[(size_t)row * out_row + (size_t)head * out_head + i] = acc[k] * inv;
    }
}
extern "C" __global__ void attend(ATTEND_PARAMS(float)) { attend_t(ATTEND_ARGS); }
extern "C" __global__ void attend_bf16(ATTEND_PARAMS(unsigned short)) { attend_t(ATTEND_ARGS); }

// out[rows[i]][..] += w[i] * y[i][..]; one block per i. Rows within one launch are distinct
// (the tokens of one expert), so no two blocks write the same row.
extern "C" __global__ void scatter_add_weighted(float* out, const float* y, const int* rows,
                                                const float* w, int d) {
    float* o = out + (size_t)rows[blockIdx.x] * d;
    const float* s = y + (size_t)blockIdx.x * d;
    float wi = w[blockIdx.x];
    for (int j = threadIdx.x; j < d; j += blockDim.x) o[j] += wi * s[j];
}

extern "C" __global__ void fill_zero(float* x, long n) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] = 0.0f;
}
