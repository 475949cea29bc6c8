/*
 * The small per-layer operations of a Llama-family decoder, each fused into one pass over memory.
 *
 * In eager torch, an RMSNorm is six operators (to, pow, mean, add, rsqrt, two muls), a rotary
 * embedding about sixteen (slices, neg, cat, four muls, two adds per tensor) and SiLU-times-up two:
 * every one allocates its output and walks the whole activation again, and at decode sizes each
 * costs more in dispatch than in arithmetic. Here each is one call that reads its inputs once.
 *
 * Rows are the packed tokens; threads split rows only when a call is big enough to repay the fork
 * (a prefill chunk), never for a decode step's handful of rows.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "kv_cache.h"

/* Below this many floats a call runs on the calling thread alone. */
#define PARALLEL_MIN 65536

/*
 * out[r] = x[r] / rms(x[r]) * w, or with a residual: residual[r] += x[r], then out[r] = norm of
 * residual[r] (the add of the previous block's output and the norm of the next block, as one pass).
 * x rows are `x_stride` floats apart; residual and out are contiguous [rows, dim].
 */
void bowline_rms_norm_f32(const float *x, int64_t x_stride, float *residual, const float *w, float *out,
                          int64_t rows, int64_t dim, float eps, int num_threads)
{
#pragma omp parallel for num_threads(num_threads) if (rows * dim >= PARALLEL_MIN) schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
        const float *xr = x + r * x_stride;
        const float *src = xr;
        if (residual) {
            float *rr = residual + r * dim;
#pragma omp simd
            for (int64_t d = 0; d < dim; ++d) rr[d] += xr[d];
            src = rr;
        }
        float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
        for (int64_t d = 0; d < dim; ++d) ss += src[d] * src[d];
        const float inv = 1.0f / sqrtf(ss / (float)dim + eps);
        float *o = out + r * dim;
#pragma omp simd
        for (int64_t d = 0; d < dim; ++d) o[d] = w[d] * (src[d] * inv);
    }
}

/* out[r] = silu(gate[r]) * up[r]; gate and up rows `gate_stride` / `up_stride` floats apart. */
void bowline_silu_mul_f32(const float *gate, int64_t gate_stride, const float *up, int64_t up_stride, float *out,
                          int64_t rows, int64_t dim, int num_threads)
{
#pragma omp parallel for num_threads(num_threads) if (rows * dim >= PARALLEL_MIN) schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
        const float *g = gate + r * gate_stride;
        const float *u = up + r * up_stride;
        float *o = out + r * dim;
#pragma omp simd
        for (int64_t d = 0; d < dim; ++d) o[d] = g[d] / (1.0f + expf(-g[d])) * u[d];
    }
}

/*
 * Rotary position embedding in place, in transformers' "rotate half" form: for i < rot_dim / 2,
 *   x[i]            <- x[i] * cos[i] - x[i + half] * sin[i]
 *   x[i + half]     <- x[i + half] * cos[i + half] + x[i] * sin[i + half]
 * x: [rows, heads, head_dim] with rows `row_stride` floats apart (heads contiguous); cos, sin:
 * [rows, rot_dim], the row's position already applied (any rope scaling is in the tables). Dimensions
 * past rot_dim (partial rotary) are left as they are.
 */
void bowline_rotary_f32(float *x, int64_t row_stride, int64_t rows, int64_t heads, int64_t head_dim,
                        const float *cos_t, const float *sin_t, int64_t rot_dim, int num_threads)
{
    const int64_t half = rot_dim / 2;
#pragma omp parallel for num_threads(num_threads) if (rows * heads * rot_dim >= PARALLEL_MIN) schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
        const float *c = cos_t + r * rot_dim;
        const float *s = sin_t + r * rot_dim;
        for (int64_t h = 0; h < heads; ++h) {
            float *a = x + r * row_stride + h * head_dim;
            float *b = a + half;
#pragma omp simd
            for (int64_t i = 0; i < half; ++i) {
                const float lo = a[i], hi = b[i];
                a[i] = lo * c[i] - hi * s[i];
                b[i] = hi * c[i + half] + lo * s[i + half];
            }
        }
    }
}

/*
 * The new keys and values of a step into the paged cache: k, v [T, Hkv, D] with rows `k_stride` /
 * `v_stride` floats apart (heads contiguous: views of the q/k/v product), caches [Hkv, S, D] of
 * float32, float16 or bfloat16 elements (kv_kind, kv_cache.h), rounded to nearest even.
 * One call for both, where torch's index_copy_ is two of ~15 us each at decode sizes.
 */
void bowline_write_kv_f32(const float *k, int64_t k_stride, const float *v, int64_t v_stride, void *k_cache,
                          void *v_cache, int kv_kind, const int64_t *slots, int64_t tokens, int64_t kv_heads,
                          int64_t head_dim, int64_t num_slots, int num_threads)
{
    const int64_t rb = head_dim * kv_elem_size(kv_kind);
#pragma omp parallel for num_threads(num_threads) if (tokens * kv_heads * head_dim >= PARALLEL_MIN) schedule(static)
    for (int64_t t = 0; t < tokens; ++t) {
        for (int64_t h = 0; h < kv_heads; ++h) {
            const int64_t dst = (h * num_slots + slots[t]) * rb;
            kv_store_row((char *)k_cache + dst, kv_kind, head_dim, k + t * k_stride + h * head_dim);
            kv_store_row((char *)v_cache + dst, kv_kind, head_dim, v + t * v_stride + h * head_dim);
        }
    }
}

/*
 * out[r] = the first index of row r's largest value, torch.argmax's answer, or -1 where the row holds a NaN
 * (torch ranks NaN highest; the caller asks torch then). Why: torch's CPU argmax walks a row one element at
 * a time, 300-365 us for 16 rows of a 16000-token vocabulary (2 threads), a few % of a 16-sequence decode
 * step; this takes 53 us (90 us with the Python call around it). The max is taken over the floats' bits
 * mapped to ordered integers, so -ffast-math's assumptions about infinities never apply (masked logits
 * are -inf); the first index is found by float equality, so -0.0 and 0.0 tie as they do for torch.
 */
void bowline_argmax_rows_f32(const float *x, int64_t stride, int64_t rows, int64_t n, int64_t *out)
{
    for (int64_t r = 0; r < rows; ++r) {
        const float *row = x + r * stride;
        const int32_t *bits = (const int32_t *)row;
        int32_t best = INT32_MIN;
        uint32_t nan = 0;
#pragma omp simd reduction(max : best) reduction(| : nan)
        for (int64_t i = 0; i < n; ++i) {
            const int32_t b = bits[i];
            const int32_t key = b ^ ((b >> 31) & 0x7fffffff);
            best = key > best ? key : best;
            nan |= (uint32_t)((uint32_t)(b & 0x7fffffff) > 0x7f800000u);
        }
        int64_t at = -1;
        if (!nan && n > 0) {
            const int32_t b = best ^ ((best >> 31) & 0x7fffffff);
            float top;
            memcpy(&top, &b, sizeof top);
            for (int64_t i0 = 0; i0 < n && at < 0; i0 += 64) { /* 64 at a time: a vector test, then the one hit */
                const int64_t i1 = i0 + 64 < n ? i0 + 64 : n;
                int hit = 0;
#pragma omp simd reduction(| : hit)
                for (int64_t i = i0; i < i1; ++i) hit |= row[i] == top;
                for (int64_t i = i0; hit && i < i1; ++i)
                    if (row[i] == top) {
                        at = i;
                        break;
                    }
            }
        }
        out[r] = at;
    }
}
