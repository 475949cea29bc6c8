/*
 * Decode attention straight from the paged KV cache, on the CPU.
 *
 * One query token per sequence attends over its whole context, read block by block through the
 * sequence's block table: no gathered copy of the context, no padding to the longest sequence, no
 * mask. Each (sequence, key/value head) pair is one task; the query heads that share that key/value
 * head (grouped-query attention) are scored together, so every key and value row is read once.
 *
 * Layouts (float32 but for the cache, contiguous but for q's rows):
 *   q        [n, H, D]        this step's query of each decoding sequence, rows q_stride floats apart
 *                             (a view of the fused q/k/v product's rows: no copy of the queries)
 *   k, v     [Hkv, S, D]      the layer's cache, head-major; slot = block * block_size + offset;
 *                             float32, float16 or bfloat16 (kv_kind, kv_cache.h), read as float32
 *   tables   [n, stride]      block tables (int64)
 *   lens     [n]              context lengths, this step's token included (int64)
 *   out      [n, H, D]
 * Query head h uses key/value head h / (H / Hkv), as transformers' repeat_kv does.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "kv_cache.h"

/* Blocks are scattered over the cache, and hardware prefetchers stop at page boundaries: while one
 * block is read, ask for the same row of the next block (one cache line per 16 floats). Into L2
 * (locality 2), not L1: a block's worth of lines in flight into L1 stalled on its few miss buffers.
 * Bench-model shapes, 16 sequences x 192 positions, 8 layers' caches read cold, 2 threads, AVX-512:
 * 2.50-2.56 -> 1.93-2.04 ms (1.20-1.28x, 20 -> 25 GB/s); a longer distance (2-4 blocks) added nothing. */
static inline void prefetch_row(const char *row, int64_t bytes)
{
    for (int64_t x = 0; x < bytes; x += 64) __builtin_prefetch(row + x, 0, 2);
}

/* First row of the cache block holding position t of a sequence (one head's cache starts at `head`;
 * rows of `row_bytes`), or NULL past the sequence's end: `block_at(.., t0 + block_size, ..)` is the
 * block to prefetch. */
static inline const char *block_at(const char *head, const int64_t *table, int64_t t, int64_t len,
                                   int64_t block_size, int64_t row_bytes)
{
    return t < len ? head + table[t / block_size] * block_size * row_bytes : NULL;
}

/* Each query head's scores -> exp(s - max) in place, and 1 / their sum (the output is normalised at the end). */
static void softmax_rows(float *scores, int64_t G, int64_t len, float *inv_sum)
{
    for (int64_t g = 0; g < G; ++g) {
        float *row = scores + g * len;
        float m = row[0];
        for (int64_t t = 1; t < len; ++t) m = row[t] > m ? row[t] : m;
        float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (int64_t t = 0; t < len; ++t) {
            row[t] = expf(row[t] - m);
            sum += row[t];
        }
        inv_sum[g] = 1.0f / sum;
    }
}

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#include <string.h>

/* Head sizes of 64 and 128 on AVX-512 and AVX2: each query head's output accumulates in registers
 * across the whole context, a key or value row read once per task. The generic loops below keep the
 * accumulator in memory (a load and a store per vector per row) and reduce over a runtime D; at 16
 * sequences x 192 positions (bench model) they ran at 25 GB/s with the cache hot on AVX-512 and at
 * 16 GB/s from memory on an AVX2-only EPYC, compute-bound, and this path reaches the memory's speed
 * instead. The vectors are GCC's (16 floats on AVX-512, 8 on AVX2), so one source serves both. */
#if defined(__AVX512F__)
#define VW 16
#define VEC_ACC 24 /* accumulator registers for the value pass (of 32); the rest hold a row and the probabilities */
#define VEC_HEADS 6 /* most query heads one value pass holds (24 accumulators at 4 vectors a row) */
#else
#define VW 8
#define VEC_ACC 12 /* of 16 ymm registers */
#define VEC_HEADS 1 /* a row is 8 or more vectors here */
#endif
#define VEC_CHUNK 8 /* most vectors of a row the value pass accumulates at once: D = 128 on AVX2 takes two */
typedef float vec __attribute__((vector_size(VW * 4)));

static inline __attribute__((always_inline)) vec loadv(const float *p)
{
    vec v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* VW elements of a cache row from element i, as float32 (kind a constant after inlining). */
static inline __attribute__((always_inline)) vec load_kv(const char *row, int64_t i, const int kind)
{
    if (kind == KV_F32) return loadv((const float *)row + i);
#if defined(__AVX512F__)
    const __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)row + i));
    if (kind == KV_F16) return (vec)_mm512_cvtph_ps(h);
    return (vec)_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
#else
    const __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)row + i));
#if defined(__F16C__)
    if (kind == KV_F16) return (vec)_mm256_cvtph_ps(h);
#endif
    return (vec)_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
#endif
}

/* Whether the vector path reads this kind of cache (float16 needs F16C where AVX-512 is absent). */
static inline int vec_reads(int kind)
{
#if !defined(__AVX512F__) && !defined(__F16C__)
    if (kind == KV_F16) return 0;
#endif
    return 1;
}

static inline __attribute__((always_inline)) float hsum(vec v)
{
#if defined(__AVX512F__)
    return _mm512_reduce_add_ps((__m512)v);
#else
    __m128 s = _mm_add_ps(_mm256_castps256_ps128((__m256)v), _mm256_extractf128_ps((__m256)v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
#endif
}

static inline __attribute__((always_inline)) void vec_scores(
    const float *qi, const char *kh, const int64_t *table, int64_t len, int64_t block_size, int64_t G,
    float scale, float *scores, const int dv, const int kind)
{
    const int64_t D = VW * dv, rb = D * kv_elem_size(kind);
    for (int64_t t0 = 0; t0 < len; t0 += block_size) {
        const char *kb = block_at(kh, table, t0, len, block_size, rb);
        const char *next = block_at(kh, table, t0 + block_size, len, block_size, rb);
        const int64_t tn = len - t0 < block_size ? len - t0 : block_size;
        for (int64_t j = 0; j < tn; ++j) {
            const char *kr = kb + j * rb;
            if (next) prefetch_row(next + j * rb, rb);
            for (int64_t g = 0; g < G; ++g) {
                const float *qg = qi + g * D;
                /* two partial sums halve the chain of dependent multiply-adds */
                vec s0 = loadv(qg) * load_kv(kr, 0, kind), s1 = loadv(qg + VW) * load_kv(kr, VW, kind);
#pragma GCC unroll 16
                for (int v = 2; v < dv; v += 2) {
                    s0 += loadv(qg + VW * v) * load_kv(kr, VW * v, kind);
                    s1 += loadv(qg + VW * (v + 1)) * load_kv(kr, VW * (v + 1), kind);
                }
                scores[g * len + t0 + j] = hsum(s0 + s1) * scale;
            }
        }
    }
}

/* out rows g0 .. g0 + gc - 1, vectors v0 .. v0 + vc - 1 of the task: sum_t p[g][t] * v_t / sum[g],
 * gc * vc accumulators. */
static inline __attribute__((always_inline)) void vec_values(
    const char *vh, const int64_t *table, int64_t len, int64_t block_size, const float *scores,
    const float *inv_sum, int64_t g0, int v0, float *oi, const int gc, const int vc, const int dv, const int kind)
{
    const int64_t D = VW * dv, rb = D * kv_elem_size(kind);
    vec acc[VEC_HEADS][VEC_CHUNK];
#pragma GCC unroll 8
    for (int g = 0; g < gc; ++g)
#pragma GCC unroll 8
        for (int v = 0; v < vc; ++v) acc[g][v] = (vec){0};
    for (int64_t t0 = 0; t0 < len; t0 += block_size) {
        const char *vb = block_at(vh, table, t0, len, block_size, rb);
        const char *next = block_at(vh, table, t0 + block_size, len, block_size, rb);
        const int64_t tn = len - t0 < block_size ? len - t0 : block_size;
        for (int64_t j = 0; j < tn; ++j) {
            const char *vr = vb + j * rb;
            if (next && v0 == 0) prefetch_row(next + j * rb, rb);
            vec p[VEC_HEADS];
#pragma GCC unroll 8
            for (int g = 0; g < gc; ++g) p[g] = (vec){0} + scores[(g0 + g) * len + t0 + j];
#pragma GCC unroll 8
            for (int v = 0; v < vc; ++v) {
                const vec row = load_kv(vr, VW * (v0 + v), kind);
#pragma GCC unroll 8
                for (int g = 0; g < gc; ++g) acc[g][v] += p[g] * row;
            }
        }
    }
#pragma GCC unroll 8
    for (int g = 0; g < gc; ++g)
#pragma GCC unroll 8
        for (int v = 0; v < vc; ++v) {
            const vec out = acc[g][v] * inv_sum[g0 + g];
            memcpy(oi + (g0 + g) * D + VW * (v0 + v), &out, sizeof out);
        }
}

/* The value pass for any G: vectors in chunks of at most VEC_CHUNK, query heads in chunks of as many
 * as the accumulators hold (AVX-512: 6 at D = 64, 3 at 128; AVX2: 1); a later chunk reads the values
 * again, from L2. */
static inline __attribute__((always_inline)) void vec_values_all(
    const char *vh, const int64_t *table, int64_t len, int64_t block_size, const float *scores,
    const float *inv_sum, int64_t G, float *oi, const int dv, const int kind)
{
    const int vc = dv < VEC_CHUNK ? dv : VEC_CHUNK;
    const int64_t most = VEC_ACC / vc;
    for (int v0 = 0; v0 < dv; v0 += vc)
        for (int64_t g0 = 0; g0 < G; g0 += most) {
            const int64_t gc = G - g0 < most ? G - g0 : most;
            switch (gc) {
            case 1: vec_values(vh, table, len, block_size, scores, inv_sum, g0, v0, oi, 1, vc, dv, kind); break;
#if VEC_HEADS == 6
            case 2: vec_values(vh, table, len, block_size, scores, inv_sum, g0, v0, oi, 2, vc, dv, kind); break;
            case 3: vec_values(vh, table, len, block_size, scores, inv_sum, g0, v0, oi, 3, vc, dv, kind); break;
            case 4: vec_values(vh, table, len, block_size, scores, inv_sum, g0, v0, oi, 4, vc, dv, kind); break;
            case 5: vec_values(vh, table, len, block_size, scores, inv_sum, g0, v0, oi, 5, vc, dv, kind); break;
#endif
            default: vec_values(vh, table, len, block_size, scores, inv_sum, g0, v0, oi, VEC_HEADS, vc, dv, kind); break;
            }
        }
}

/* One (sequence, key/value head) task: scores, softmax, values, for a head size of VW * dv. */
static inline __attribute__((always_inline)) void vec_task(
    const float *qi, const char *kh, const char *vh, const int64_t *table, int64_t len, int64_t block_size,
    int64_t G, float scale, float *scores, float *inv_sum, float *oi, const int dv, const int kind)
{
    vec_scores(qi, kh, table, len, block_size, G, scale, scores, dv, kind);
    softmax_rows(scores, G, len, inv_sum);
    vec_values_all(vh, table, len, block_size, scores, inv_sum, G, oi, dv, kind);
}

/* vec_task with the head size and the cache's kind as constants. */
static void vec_task_any(
    const float *qi, const char *kh, const char *vh, const int64_t *table, int64_t len, int64_t block_size,
    int64_t G, float scale, float *scores, float *inv_sum, float *oi, int64_t D, int kind)
{
#define VEC_TASK(dv, kind) vec_task(qi, kh, vh, table, len, block_size, G, scale, scores, inv_sum, oi, dv, kind)
    if (D == 64) {
        if (kind == KV_F32) VEC_TASK(64 / VW, KV_F32);
        else if (kind == KV_F16) VEC_TASK(64 / VW, KV_F16);
        else VEC_TASK(64 / VW, KV_BF16);
    } else {
        if (kind == KV_F32) VEC_TASK(128 / VW, KV_F32);
        else if (kind == KV_F16) VEC_TASK(128 / VW, KV_F16);
        else VEC_TASK(128 / VW, KV_BF16);
    }
#undef VEC_TASK
}
#endif

void bowline_paged_decode_f32(
    const float *q, int64_t q_stride, const void *k_cache, const void *v_cache, int kv_kind,
    const int64_t *tables, int64_t table_stride, const int64_t *lens,
    int64_t n, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
    int64_t num_slots, int64_t block_size, float scale, float *out, int num_threads)
{
    const int64_t G = num_heads / num_kv_heads;
    const int64_t D = head_dim, rb = D * kv_elem_size(kv_kind); /* bytes of a cache row */
    int64_t max_len = 1;
    for (int64_t i = 0; i < n; ++i)
        if (lens[i] > max_len) max_len = lens[i];

#pragma omp parallel num_threads(num_threads)
    {
        float *scores = malloc(sizeof(float) * (size_t)(G * max_len));
        float *acc = malloc(sizeof(float) * (size_t)(G * D));
        float *inv_sum = malloc(sizeof(float) * (size_t)G);
        float *row = malloc(sizeof(float) * (size_t)D); /* a key or value row as float32 (generic loops) */

#pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < n * num_kv_heads; ++task) {
            const int64_t i = task / num_kv_heads, h = task % num_kv_heads;
            const int64_t len = lens[i];
            const int64_t *table = tables + i * table_stride;
            const float *qi = q + i * q_stride + h * G * D;
            const char *kh = (const char *)k_cache + h * num_slots * rb;
            const char *vh = (const char *)v_cache + h * num_slots * rb;
#if defined(__AVX512F__) || defined(__AVX2__)
            if ((D == 64 || D == 128) && vec_reads(kv_kind)) {
                vec_task_any(qi, kh, vh, table, len, block_size, G, scale, scores, inv_sum,
                             out + (i * num_heads + h * G) * D, D, kv_kind);
                continue;
            }
#endif

            /* scores[g][t] = scale * q_g . k_t */
            for (int64_t t0 = 0; t0 < len; t0 += block_size) {
                const char *kb = block_at(kh, table, t0, len, block_size, rb);
                const char *next = block_at(kh, table, t0 + block_size, len, block_size, rb);
                const int64_t tn = len - t0 < block_size ? len - t0 : block_size;
                for (int64_t j = 0; j < tn; ++j) {
                    const float *kr = row;
                    kv_load_row(kb + j * rb, kv_kind, D, row);
                    if (next) prefetch_row(next + j * rb, rb);
                    for (int64_t g = 0; g < G; ++g) {
                        const float *qg = qi + g * D;
                        float s = 0.0f;
#pragma omp simd reduction(+ : s)
                        for (int64_t d = 0; d < D; ++d) s += qg[d] * kr[d];
                        scores[g * len + t0 + j] = s * scale;
                    }
                }
            }
            softmax_rows(scores, G, len, inv_sum); /* normalised at the end */
            /* acc[g] = sum_t p[g][t] * v_t */
            for (int64_t x = 0; x < G * D; ++x) acc[x] = 0.0f;
            for (int64_t t0 = 0; t0 < len; t0 += block_size) {
                const char *vb = block_at(vh, table, t0, len, block_size, rb);
                const char *next = block_at(vh, table, t0 + block_size, len, block_size, rb);
                const int64_t tn = len - t0 < block_size ? len - t0 : block_size;
                for (int64_t j = 0; j < tn; ++j) {
                    const float *vr = row;
                    kv_load_row(vb + j * rb, kv_kind, D, row);
                    if (next) prefetch_row(next + j * rb, rb);
                    for (int64_t g = 0; g < G; ++g) {
                        const float p = scores[g * len + t0 + j];
                        float *ag = acc + g * D;
#pragma omp simd
                        for (int64_t d = 0; d < D; ++d) ag[d] += p * vr[d];
                    }
                }
            }
            float *oi = out + (i * num_heads + h * G) * D;
            for (int64_t g = 0; g < G; ++g)
                for (int64_t d = 0; d < D; ++d) oi[g * D + d] = acc[g * D + d] * inv_sum[g];
        }
        free(row);
        free(inv_sum);
        free(acc);
        free(scores);
    }
}
