/*
 * Decode attention straight from the paged KV cache, on the CPU.
 *
 * One query token per sequence attends over its whole context, read block by block through the
 * sequence's block table: no gathered copy of the context, no padding to the longest sequence, no
 * mask. Each (sequence, key/value head) pair is one task; the query heads that share that key/value
 * head (grouped-query attention) are scored together, so every key and value row is read once.
 *
 * Layouts (all float32, contiguous but for q's rows):
 *   q        [n, H, D]        this step's query of each decoding sequence, rows q_stride floats apart
 *                             (a view of the fused q/k/v product's rows: no copy of the queries)
 *   k, v     [Hkv, S, D]      the layer's cache, head-major; slot = block * block_size + offset
 *   tables   [n, stride]      block tables (int64)
 *   lens     [n]              context lengths, this step's token included (int64)
 *   out      [n, H, D]
 * Query head h uses key/value head h / (H / Hkv), as transformers' repeat_kv does.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

/* Blocks are scattered over the cache, and hardware prefetchers stop at page boundaries: while one
 * block is read, ask for the same row of the next block (one cache line per 16 floats). Into L2
 * (locality 2), not L1: a block's worth of lines in flight into L1 stalled on its few miss buffers.
 * Bench-model shapes, 16 sequences x 192 positions, 8 layers' caches read cold, 2 threads, AVX-512:
 * 2.50-2.56 -> 1.93-2.04 ms (1.20-1.28x, 20 -> 25 GB/s); a longer distance (2-4 blocks) added nothing. */
static inline void prefetch_row(const float *row, int64_t d)
{
    for (int64_t x = 0; x < d; x += 16) __builtin_prefetch(row + x, 0, 2);
}

/* First row of the cache block holding position t of a sequence (one head's cache starts at `head`),
 * or NULL past the sequence's end: `block_at(.., t0 + block_size, ..)` is the block to prefetch. */
static inline const float *block_at(const float *head, const int64_t *table, int64_t t, int64_t len,
                                    int64_t block_size, int64_t d)
{
    return t < len ? head + table[t / block_size] * block_size * d : NULL;
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
    const float *qi, const float *kh, const int64_t *table, int64_t len, int64_t block_size, int64_t G,
    float scale, float *scores, const int dv)
{
    const int64_t D = VW * dv;
    for (int64_t t0 = 0; t0 < len; t0 += block_size) {
        const float *kb = block_at(kh, table, t0, len, block_size, D);
        const float *next = block_at(kh, table, t0 + block_size, len, block_size, D);
        const int64_t tn = len - t0 < block_size ? len - t0 : block_size;
        for (int64_t j = 0; j < tn; ++j) {
            const float *kr = kb + j * D;
            if (next) prefetch_row(next + j * D, D);
            for (int64_t g = 0; g < G; ++g) {
                const float *qg = qi + g * D;
                /* two partial sums halve the chain of dependent multiply-adds */
                vec s0 = loadv(qg) * loadv(kr), s1 = loadv(qg + VW) * loadv(kr + VW);
#pragma GCC unroll 16
                for (int v = 2; v < dv; v += 2) {
                    s0 += loadv(qg + VW * v) * loadv(kr + VW * v);
                    s1 += loadv(qg + VW * (v + 1)) * loadv(kr + VW * (v + 1));
                }
                scores[g * len + t0 + j] = hsum(s0 + s1) * scale;
            }
        }
    }
}

/* out rows g0 .. g0 + gc - 1, vectors v0 .. v0 + vc - 1 of the task: sum_t p[g][t] * v_t / sum[g],
 * gc * vc accumulators. */
static inline __attribute__((always_inline)) void vec_values(
    const float *vh, const int64_t *table, int64_t len, int64_t block_size, const float *scores,
    const float *inv_sum, int64_t g0, int v0, float *oi, const int gc, const int vc, const int dv)
{
    const int64_t D = VW * dv;
    vec acc[VEC_HEADS][VEC_CHUNK];
#pragma GCC unroll 8
    for (int g = 0; g < gc; ++g)
#pragma GCC unroll 8
        for (int v = 0; v < vc; ++v) acc[g][v] = (vec){0};
    for (int64_t t0 = 0; t0 < len; t0 += block_size) {
        const float *vb = block_at(vh, table, t0, len, block_size, D);
        const float *next = block_at(vh, table, t0 + block_size, len, block_size, D);
        const int64_t tn = len - t0 < block_size ? len - t0 : block_size;
        for (int64_t j = 0; j < tn; ++j) {
            const float *vr = vb + j * D + VW * v0;
            if (next && v0 == 0) prefetch_row(next + j * D, D);
            vec p[VEC_HEADS];
#pragma GCC unroll 8
            for (int g = 0; g < gc; ++g) p[g] = (vec){0} + scores[(g0 + g) * len + t0 + j];
#pragma GCC unroll 8
            for (int v = 0; v < vc; ++v) {
                const vec row = loadv(vr + VW * v);
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
    const float *vh, const int64_t *table, int64_t len, int64_t block_size, const float *scores,
    const float *inv_sum, int64_t G, float *oi, const int dv)
{
    const int vc = dv < VEC_CHUNK ? dv : VEC_CHUNK;
    const int64_t most = VEC_ACC / vc;
    for (int v0 = 0; v0 < dv; v0 += vc)
        for (int64_t g0 = 0; g0 < G; g0 += most) {
            const int64_t gc = G - g0 < most ? G - g0 : most;
            switch (gc) {
            case 1: vec_values(vh, table, len, block_size, scores, inv_sum, g0, v0, oi, 1, vc, dv); break;
#if VEC_HEADS == 6
            case 2: vec_values(vh, table, len, block_size, scores, inv_sum, g0, v0, oi, 2, vc, dv); break;
            case 3: vec_values(vh, table, len, block_size, scores, inv_sum, g0, v0, oi, 3, vc, dv); break;
            case 4: vec_values(vh, table, len, block_size, scores, inv_sum, g0, v0, oi, 4, vc, dv); break;
            case 5: vec_values(vh, table, len, block_size, scores, inv_sum, g0, v0, oi, 5, vc, dv); break;
#endif
            default: vec_values(vh, table, len, block_size, scores, inv_sum, g0, v0, oi, VEC_HEADS, vc, dv); break;
            }
        }
}

/* One (sequence, key/value head) task: scores, softmax, values, for a head size of VW * dv. */
static inline __attribute__((always_inline)) void vec_task(
    const float *qi, const float *kh, const float *vh, const int64_t *table, int64_t len, int64_t block_size,
    int64_t G, float scale, float *scores, float *inv_sum, float *oi, const int dv)
{
    vec_scores(qi, kh, table, len, block_size, G, scale, scores, dv);
    softmax_rows(scores, G, len, inv_sum);
    vec_values_all(vh, table, len, block_size, scores, inv_sum, G, oi, dv);
}
#endif

void bowline_paged_decode_f32(
    const float *q, int64_t q_stride, const float *k_cache, const float *v_cache,
    const int64_t *tables, int64_t table_stride, const int64_t *lens,
    int64_t n, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
    int64_t num_slots, int64_t block_size, float scale, float *out, int num_threads)
{
    const int64_t G = num_heads / num_kv_heads;
    const int64_t D = head_dim;
    int64_t max_len = 1;
    for (int64_t i = 0; i < n; ++i)
        if (lens[i] > max_len) max_len = lens[i];

#pragma omp parallel num_threads(num_threads)
    {
        float *scores = malloc(sizeof(float) * (size_t)(G * max_len));
        float *acc = malloc(sizeof(float) * (size_t)(G * D));
        float *inv_sum = malloc(sizeof(float) * (size_t)G);

#pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < n * num_kv_heads; ++task) {
            const int64_t i = task / num_kv_heads, h = task % num_kv_heads;
            const int64_t len = lens[i];
            const int64_t *table = tables + i * table_stride;
            const float *qi = q + i * q_stride + h * G * D;
            const float *kh = k_cache + h * num_slots * D;
            const float *vh = v_cache + h * num_slots * D;
#if defined(__AVX512F__) || defined(__AVX2__)
            if (D == 64 || D == 128) {
                float *oi = out + (i * num_heads + h * G) * D;
                if (D == 64)
                    vec_task(qi, kh, vh, table, len, block_size, G, scale, scores, inv_sum, oi, 64 / VW);
                else
                    vec_task(qi, kh, vh, table, len, block_size, G, scale, scores, inv_sum, oi, 128 / VW);
                continue;
            }
#endif

            /* scores[g][t] = scale * q_g . k_t */
            for (int64_t t0 = 0; t0 < len; t0 += block_size) {
                const float *kb = block_at(kh, table, t0, len, block_size, D);
                const float *next = block_at(kh, table, t0 + block_size, len, block_size, D);
                const int64_t tn = len - t0 < block_size ? len - t0 : block_size;
                for (int64_t j = 0; j < tn; ++j) {
                    const float *kr = kb + j * D;
                    if (next) prefetch_row(next + j * D, D);
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
                const float *vb = block_at(vh, table, t0, len, block_size, D);
                const float *next = block_at(vh, table, t0 + block_size, len, block_size, D);
                const int64_t tn = len - t0 < block_size ? len - t0 : block_size;
                for (int64_t j = 0; j < tn; ++j) {
                    const float *vr = vb + j * D;
                    if (next) prefetch_row(next + j * D, D);
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
        free(inv_sum);
        free(acc);
        free(scores);
    }
}
