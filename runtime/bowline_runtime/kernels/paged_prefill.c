/*
 * Causal prefill attention straight from the paged KV cache, on the CPU (flash-attention style).
 *
 * A prefill chunk's n queries sit at positions ctx_len - n .. ctx_len - 1 of their sequence; its keys
 * and values, this chunk's included, are already in the cache at slots[0 .. ctx_len). Each query
 * attends to every key at or before its own position. One task is (key/value head, block of BQ query positions): the query
 * heads sharing that key/value head are all rows of the task, so every key block is loaded and
 * transposed once for all of them. Keys go BK at a time with an online softmax, so no score matrix
 * larger than RB x BK ever exists. Cache layout as in paged_decode.c (float32, float16 or bfloat16
 * elements, kv_cache.h: a key block is converted as it is transposed, a value block into a float32
 * copy); q is [H, n, D], out [n, H, D].
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kv_cache.h"

#define BQ 64 /* query positions per task */
#define BK 64 /* keys per step of the online softmax */
/* Rows scored together: each transposed key row is loaded once for RB queries. RB x VL accumulators must
 * fit the vector registers with room for the loads: 8 zmm of 32 on AVX-512; on AVX2 8 rows took all 16
 * ymm and spilled, 6 rows (12 ymm) ran 1.33x faster (AVX2 EPYC, bench shapes, 512-token prompt, 8
 * layers, builds rotated: 29.0 -> 21.8 ms; a 128-token prompt 2.77 -> 2.08 ms; 4 rows: 25.7 ms). */
#ifdef __AVX512F__
#define RB 8
#else
#define RB 6
#endif
#define VL 16 /* floats per step of the inner loops (one AVX-512 register); head_dim must be a multiple */

void bowline_paged_prefill_f32(
    const float *q, const void *k_cache, const void *v_cache, int kv_kind, const int64_t *slots, int64_t ctx_len,
    int64_t n, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, int64_t num_slots,
    float scale, float *out, int num_threads)
{
    const int64_t G = num_heads / num_kv_heads;
    const int64_t D = head_dim, rb = D * kv_elem_size(kv_kind); /* bytes of a cache row */
    const int64_t q_blocks = (n + BQ - 1) / BQ;
    const int64_t rows_max = (G * BQ + RB - 1) / RB * RB;
    const int64_t first_pos = ctx_len - n;

#pragma omp parallel num_threads(num_threads)
    {
        float *kt = malloc(sizeof(float) * (size_t)(D * BK));
        float *krow = malloc(sizeof(float) * (size_t)D);
        float *vblock = kv_kind == KV_F32 ? NULL : malloc(sizeof(float) * (size_t)(BK * D)); /* values as float32 */
        float *acc = malloc(sizeof(float) * (size_t)(rows_max * D));
        float *zero_row = calloc((size_t)D, sizeof(float));
        float *m = malloc(sizeof(float) * (size_t)rows_max);
        float *l = malloc(sizeof(float) * (size_t)rows_max);
        const float **qrow = malloc(sizeof(float *) * (size_t)rows_max);
        int64_t *pos = malloc(sizeof(int64_t) * (size_t)rows_max);
        const float *vrow[BK];

#pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < num_kv_heads * q_blocks; ++task) {
            /* Later query blocks see more keys: hand them out first. */
            const int64_t h = task % num_kv_heads, qb = q_blocks - 1 - task / num_kv_heads;
            const int64_t i0 = qb * BQ, i1 = i0 + BQ < n ? i0 + BQ : n;
            const char *kh = (const char *)k_cache + h * num_slots * rb, *vh = (const char *)v_cache + h * num_slots * rb;
            int64_t rows = 0;
            for (int64_t g = 0; g < G; ++g)
                for (int64_t i = i0; i < i1; ++i, ++rows) {
                    qrow[rows] = q + ((h * G + g) * n + i) * D;
                    pos[rows] = first_pos + i;
                }
            for (; rows % RB; ++rows) { /* padding rows: no keys, never written */
                qrow[rows] = zero_row;
                pos[rows] = -1;
            }
            for (int64_t r = 0; r < rows; ++r) {
                m[r] = 0.0f;
                l[r] = 0.0f;
            }
            memset(acc, 0, sizeof(float) * (size_t)(rows * D));
            const int64_t key_end = first_pos + i1; /* keys [0, key_end) are seen by some row */

            for (int64_t k0 = 0; k0 < key_end; k0 += BK) {
                const int64_t tn = key_end - k0 < BK ? key_end - k0 : BK;
                for (int64_t k = 0; k < BK; ++k) {
                    if (k < tn) {
                        const int64_t slot = slots[k0 + k];
                        const float *kr = krow;
                        if (kv_kind == KV_F32) {
                            kr = (const float *)(kh + slot * rb);
                            vrow[k] = (const float *)(vh + slot * rb);
                        } else {
                            kv_load_row(kh + slot * rb, kv_kind, D, krow);
                            kv_load_row(vh + slot * rb, kv_kind, D, vblock + k * D);
                            vrow[k] = vblock + k * D;
                        }
                        for (int64_t d = 0; d < D; ++d) kt[d * BK + k] = kr[d];
                    } else {
                        for (int64_t d = 0; d < D; ++d) kt[d * BK + k] = 0.0f;
                    }
                }
                for (int64_t r0 = 0; r0 < rows; r0 += RB) {
                    float s[RB][BK];
                    /* VL keys x RB rows at a time: the RB accumulators stay in vector registers */
                    for (int c = 0; c < BK; c += VL) {
                        float t[RB][VL] = {{0}};
                        for (int64_t d = 0; d < D; ++d) {
                            const float *kd = kt + d * BK + c;
#pragma GCC unroll 16
                            for (int r = 0; r < RB; ++r) {
                                const float a = qrow[r0 + r][d];
#pragma omp simd
                                for (int x = 0; x < VL; ++x) t[r][x] += a * kd[x];
                            }
                        }
#pragma GCC unroll 16
                        for (int r = 0; r < RB; ++r)
                            for (int x = 0; x < VL; ++x) s[r][c + x] = t[r][x] * scale;
                    }
                    for (int r = 0; r < RB; ++r) {
                        /* keys k0 .. pos are allowed: a prefix of this block */
                        int64_t valid = pos[r0 + r] - k0 + 1;
                        if (valid > tn) valid = tn;
                        float *sr = s[r];
                        if (valid <= 0) {
                            for (int k = 0; k < BK; ++k) sr[k] = 0.0f;
                            continue;
                        }
                        float mx = sr[0];
                        for (int64_t k = 1; k < valid; ++k) mx = fmaxf(mx, sr[k]);
                        const float m_old = m[r0 + r];
                        const int first = l[r0 + r] == 0.0f;
                        const float m_new = first || mx > m_old ? mx : m_old;
                        const float corr = first ? 0.0f : expf(m_old - m_new);
                        float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
                        for (int64_t k = 0; k < valid; ++k) {
                            sr[k] = expf(sr[k] - m_new);
                            sum += sr[k];
                        }
                        for (int64_t k = valid; k < BK; ++k) sr[k] = 0.0f;
                        m[r0 + r] = m_new;
                        l[r0 + r] = l[r0 + r] * corr + sum;
                        if (corr != 1.0f) {
                            float *ar = acc + (r0 + r) * D;
                            for (int64_t d = 0; d < D; ++d) ar[d] *= corr;
                        }
                    }
                    /* 16 dims x RB rows at a time over the block's keys: accumulators in registers */
                    for (int64_t c = 0; c < D; c += VL) {
                        float u[RB][VL];
#pragma GCC unroll 16
                        for (int r = 0; r < RB; ++r)
                            for (int x = 0; x < VL; ++x) u[r][x] = acc[(r0 + r) * D + c + x];
                        for (int64_t k = 0; k < tn; ++k) {
                            const float *vr = vrow[k] + c;
#pragma GCC unroll 16
                            for (int r = 0; r < RB; ++r) {
                                const float p = s[r][k];
#pragma omp simd
                                for (int x = 0; x < VL; ++x) u[r][x] += p * vr[x];
                            }
                        }
#pragma GCC unroll 16
                        for (int r = 0; r < RB; ++r)
                            for (int x = 0; x < VL; ++x) acc[(r0 + r) * D + c + x] = u[r][x];
                    }
                }
            }
            /* rows were laid out g-major: row g * (i1 - i0) + (i - i0) */
            const int64_t span = i1 - i0;
            for (int64_t g = 0; g < G; ++g)
                for (int64_t i = i0; i < i1; ++i) {
                    const int64_t r = g * span + (i - i0);
                    const float inv = 1.0f / l[r];
                    float *o = out + (i * num_heads + h * G + g) * D;
                    const float *ar = acc + r * D;
                    for (int64_t d = 0; d < D; ++d) o[d] = ar[d] * inv;
                }
        }
        free(pos);
        free(qrow);
        free(l);
        free(m);
        free(zero_row);
        free(acc);
        free(vblock);
        free(krow);
        free(kt);
    }
}
