/*
 * out[M, N] = x[M, K] @ dequant(w)[N, K]^T + bias, float32 activations, for quantized Linear layers:
 * int8 per output channel (weight-only or W8A8 after the caller quantizes x) and 4-bit AWQ groups.
 *
 * Why: a decode step reads every weight once per step and does two flops per weight read per row, so
 * at a few rows the product is bound by memory bandwidth. int8 weights are a quarter of float32's
 * bytes and 4-bit an eighth; the weight is dequantized in registers as it streams past, never
 * written back as floats. Scales are folded in once per output column (int8) or once per group
 * (AWQ: y = sum_g s_g * (sum_k x_k q_k - z_g * sum_k x_k), so no (q - z) * s per weight).
 *
 * A panel row of 16 columns is one 16-float vector (GCC vector extension) on AVX-512, two 8-float
 * ones elsewhere (ymm on AVX2; GCC's lowering of 16-float vectors there goes through the stack). The widening of int8 and 4-bit weights to floats uses
 * AVX-512 or AVX2 intrinsics where -march=native has them (GCC 12 turns __builtin_convertvector of
 * bytes into one scalar conversion per weight) and generic vector code elsewhere: correct on every
 * CPU, only slower there.
 *
 * Weights arrive packed once (by kernels/quant_cpu.py) in panels of NR = 16 output columns:
 *   int8: wp[P][K][16]           (int8, column j of the panel at byte j)
 *   int4: wp[P][K/2][16]         (byte j of pair i: column j of input row 2i in the low nibble, of row
 *                                 2i + 1 in the high nibble; K and the group size even)
 *         scales[P][G][16], zs[P][G][16] floats, zs = -zero * scale
 * Small row counts (decode) accumulate straight from the packed panel, up to MR = 6 rows at a time.
 * From DEQ_M rows on (prefill), each thread dequantizes one panel of gemm.c's width to floats (K x 64
 * floats on AVX-512, in L2) and runs every row against it with gemm.c's micro-kernel, so the unpacking
 * is paid once per panel, not per row, and the product runs at float32's speed.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define NR 16
#define MR 6
#define DEQ_M 16

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
/* gemm.c's float micro-kernel over one panel of its own width (64 columns on AVX-512, 16 on AVX2) */
#define HAVE_GEMM 1
int64_t bowline_gemm_panel_width(void);
void bowline_gemm_one_panel_f32(const float *x, int64_t xs, const float *panel, int64_t k, const float *bias,
                                float *out, int64_t os, int64_t ncols, int64_t m);
#endif

#if defined(__AVX512F__)
#define VW 16  /* floats per vector: a panel row is one zmm register */
#else
#define VW 8   /* a panel row is two 8-float vectors (ymm on AVX2; wider vectors spill there) */
#endif
#define NV (NR / VW)
typedef float vec __attribute__((vector_size(VW * 4)));

int64_t bowline_quant_panel_width(void) { return NR; }

static inline __attribute__((always_inline)) vec splat(float v) { return (vec){0} + v; }

static inline __attribute__((always_inline)) vec loadv(const float *p)
{
    vec v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline __attribute__((always_inline)) void storev(float *p, vec v) { memcpy(p, &v, sizeof v); }

#if defined(__AVX512F__)
#include <immintrin.h>

static inline __attribute__((always_inline)) void row_i8(const int8_t *row, vec *w)
{
    w[0] = (vec)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)row)));
}

/* Two consecutive input rows of a 4-bit panel: byte j holds column j of the first (low nibble) and of
 * the second (high nibble), so each row is one and/shift and one widening, no shuffle. */
static inline __attribute__((always_inline)) void rows_u4(const uint8_t *pair, vec *w, vec *w2)
{
    const __m128i b = _mm_loadu_si128((const __m128i *)pair), low = _mm_set1_epi8(15);
    w[0] = (vec)_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(b, low)));
    w2[0] = (vec)_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(b, 4), low)));
}
#elif defined(__AVX2__)
#include <immintrin.h>

static inline __attribute__((always_inline)) void row_i8(const int8_t *row, vec *w)
{
    const __m128i b = _mm_loadu_si128((const __m128i *)row);
    w[0] = (vec)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
    w[1] = (vec)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(b, 8)));
}

static inline __attribute__((always_inline)) void rows_u4(const uint8_t *pair, vec *w, vec *w2)
{
    const __m128i b = _mm_loadu_si128((const __m128i *)pair), low = _mm_set1_epi8(15);
    const __m128i lo = _mm_and_si128(b, low), hi = _mm_and_si128(_mm_srli_epi16(b, 4), low);
    w[0] = (vec)_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
    w[1] = (vec)_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)));
    w2[0] = (vec)_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
    w2[1] = (vec)_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));
}
#else
typedef int8_t v8i8 __attribute__((vector_size(8)));
typedef uint8_t v8u8 __attribute__((vector_size(8)));

static inline __attribute__((always_inline)) void row_i8(const int8_t *row, vec *w)
{
    v8i8 a, b;
    memcpy(&a, row, 8);
    memcpy(&b, row + 8, 8);
    w[0] = __builtin_convertvector(a, vec);
    w[1] = __builtin_convertvector(b, vec);
}

static inline __attribute__((always_inline)) void rows_u4(const uint8_t *pair, vec *w, vec *w2)
{
    v8u8 a, b;
    memcpy(&a, pair, 8);
    memcpy(&b, pair + 8, 8);
    w[0] = __builtin_convertvector(a & (uint8_t)15, vec);
    w[1] = __builtin_convertvector(b & (uint8_t)15, vec);
    w2[0] = __builtin_convertvector(a >> 4, vec);
    w2[1] = __builtin_convertvector(b >> 4, vec);
}
#endif

static inline __attribute__((always_inline)) void row_f32(const float *row, vec *w)
{
    for (int v = 0; v < NV; ++v) w[v] = loadv(row + v * VW);
}

/* Store mr rows of a panel's result: ncols of its 16 columns are real; bias may be NULL. */
static inline __attribute__((always_inline)) void store_rows(
    vec tot[MR][NV], const float *bias, float *out, int64_t os, int64_t ncols, const int mr)
{
    for (int m = 0; m < mr; ++m) {
        if (ncols == NR) {
            for (int v = 0; v < NV; ++v) storev(out + m * os + v * VW, bias ? tot[m][v] + loadv(bias + v * VW) : tot[m][v]);
            continue;
        }
        float tmp[NR];
        for (int v = 0; v < NV; ++v) storev(tmp + v * VW, tot[m][v]);
        for (int64_t j = 0; j < ncols; ++j) out[m * os + j] = tmp[j] + (bias ? bias[j] : 0.0f);
    }
}

/* acc[m] = sum over k in [k0, k1) of x[m][k] * w[k] for mr rows (two FMA chains per row for 1-2 rows,
 * where one chain would wait on its own latency). */
#define ACCUMULATE(ROW, STRIDE)                                                                             \
    do {                                                                                                    \
        vec acc2[MR][NV];                                                                                   \
        for (int m = 0; m < mr; ++m)                                                                        \
            for (int v = 0; v < NV; ++v) acc[m][v] = acc2[m][v] = splat(0.0f);                              \
        int64_t kk = k0;                                                                                    \
        if (mr <= 2)                                                                                        \
            for (; kk + 1 < k1; kk += 2) {                                                                  \
                vec w[NV], w2[NV];                                                                          \
                ROW(panel + kk * (STRIDE), w);                                                              \
                ROW(panel + (kk + 1) * (STRIDE), w2);                                                       \
                for (int m = 0; m < mr; ++m) {                                                              \
                    const vec xb = splat(x[m * xs + kk]), xb2 = splat(x[m * xs + kk + 1]);                  \
                    for (int v = 0; v < NV; ++v) {                                                          \
                        acc[m][v] += xb * w[v];                                                             \
                        acc2[m][v] += xb2 * w2[v];                                                          \
                    }                                                                                       \
                }                                                                                           \
            }                                                                                               \
        for (; kk < k1; ++kk) {                                                                             \
            vec w[NV];                                                                                      \
            ROW(panel + kk * (STRIDE), w);                                                                  \
            _Pragma("GCC unroll 6") for (int m = 0; m < mr; ++m) {                                          \
                const vec xb = splat(x[m * xs + kk]);                                                       \
                for (int v = 0; v < NV; ++v) acc[m][v] += xb * w[v];                                        \
            }                                                                                               \
        }                                                                                                   \
        for (int m = 0; m < mr; ++m)                                                                        \
            for (int v = 0; v < NV; ++v) acc[m][v] += acc2[m][v];                                           \
    } while (0)

/* The same over a 4-bit panel, whose input rows come in pairs (k0 and k1 even). */
#define ACCUMULATE_PAIRS()                                                                                  \
    do {                                                                                                    \
        vec acc2[MR][NV];                                                                                   \
        for (int m = 0; m < mr; ++m)                                                                        \
            for (int v = 0; v < NV; ++v) acc[m][v] = acc2[m][v] = splat(0.0f);                              \
        for (int64_t kk = k0; kk < k1; kk += 2) {                                                           \
            vec w[NV], w2[NV];                                                                              \
            rows_u4(panel + kk * (NR / 2), w, w2);                                                          \
            _Pragma("GCC unroll 6") for (int m = 0; m < mr; ++m) {                                          \
                const vec xb = splat(x[m * xs + kk]), xb2 = splat(x[m * xs + kk + 1]);                      \
                for (int v = 0; v < NV; ++v) {                                                              \
                    acc[m][v] += xb * w[v];                                                                 \
                    if (mr <= 2)                                                                            \
                        acc2[m][v] += xb2 * w2[v];                                                          \
                    else                                                                                    \
                        acc[m][v] += xb2 * w2[v];                                                           \
                }                                                                                           \
            }                                                                                               \
        }                                                                                                   \
        for (int m = 0; m < mr; ++m)                                                                        \
            for (int v = 0; v < NV; ++v) acc[m][v] += acc2[m][v];                                           \
    } while (0)

/* ---------------------------------------------------------------- int8, per output channel */

static inline __attribute__((always_inline)) void i8_block(
    const float *x, int64_t xs, const int8_t *panel, int64_t k, const float *scale, const float *bias,
    float *out, int64_t os, int64_t ncols, const int mr)
{
    vec acc[MR][NV];
    const int64_t k0 = 0, k1 = k;
    ACCUMULATE(row_i8, NR);
    for (int v = 0; v < NV; ++v) {
        const vec s = loadv(scale + v * VW);
        for (int m = 0; m < mr; ++m) acc[m][v] *= s;
    }
    store_rows(acc, bias, out, os, ncols, mr);
}

static void i8_rows(const float *x, int64_t xs, const int8_t *panel, int64_t k, const float *scale,
                    const float *bias, float *out, int64_t os, int64_t ncols, int64_t mr)
{
    switch (mr) {
    case 1: i8_block(x, xs, panel, k, scale, bias, out, os, ncols, 1); break;
    case 2: i8_block(x, xs, panel, k, scale, bias, out, os, ncols, 2); break;
    case 3: i8_block(x, xs, panel, k, scale, bias, out, os, ncols, 3); break;
    case 4: i8_block(x, xs, panel, k, scale, bias, out, os, ncols, 4); break;
    case 5: i8_block(x, xs, panel, k, scale, bias, out, os, ncols, 5); break;
    default: i8_block(x, xs, panel, k, scale, bias, out, os, ncols, MR); break;
    }
}

/* ---------------------------------------------------------------- 4-bit AWQ groups */

/* xsum[r * groups + g]: the sum of row r's inputs over group g (the zero point's share of the product). */
static inline __attribute__((always_inline)) void u4_block(
    const float *x, int64_t xs, const float *xsum, int64_t groups, const uint8_t *panel, const float *ps,
    const float *pz, int64_t gs, const float *bias, float *out, int64_t os, int64_t ncols, const int mr)
{
    vec tot[MR][NV];
    for (int m = 0; m < mr; ++m)
        for (int v = 0; v < NV; ++v) tot[m][v] = splat(0.0f);
    for (int64_t g = 0; g < groups; ++g) {
        vec acc[MR][NV];
        const int64_t k0 = g * gs, k1 = (g + 1) * gs;
        ACCUMULATE_PAIRS();
        for (int v = 0; v < NV; ++v) {
            const vec s = loadv(ps + g * NR + v * VW), z = loadv(pz + g * NR + v * VW);
            for (int m = 0; m < mr; ++m) tot[m][v] += acc[m][v] * s + splat(xsum[m * groups + g]) * z;
        }
    }
    store_rows(tot, bias, out, os, ncols, mr);
}

static void u4_rows(const float *x, int64_t xs, const float *xsum, int64_t groups, const uint8_t *panel,
                    const float *ps, const float *pz, int64_t gs, const float *bias, float *out,
                    int64_t os, int64_t ncols, int64_t mr)
{
    switch (mr) {
    case 1: u4_block(x, xs, xsum, groups, panel, ps, pz, gs, bias, out, os, ncols, 1); break;
    case 2: u4_block(x, xs, xsum, groups, panel, ps, pz, gs, bias, out, os, ncols, 2); break;
    case 3: u4_block(x, xs, xsum, groups, panel, ps, pz, gs, bias, out, os, ncols, 3); break;
    case 4: u4_block(x, xs, xsum, groups, panel, ps, pz, gs, bias, out, os, ncols, 4); break;
    case 5: u4_block(x, xs, xsum, groups, panel, ps, pz, gs, bias, out, os, ncols, 5); break;
    default: u4_block(x, xs, xsum, groups, panel, ps, pz, gs, bias, out, os, ncols, MR); break;
    }
}

/* ---------------------------------------------------------------- dequantized panels (many rows) */

/* Which quantized weight a many-row product dequantizes panel by panel. */
struct qweights {
    int bits;            /* 8 or 4 */
    const void *wp;      /* the packed panels */
    const float *scale;  /* int8: [P * 16]; int4: [P][groups][16] */
    const float *zs;     /* int4: -zero * scale, [P][groups][16] */
    int64_t groups, gs;  /* int4: groups of gs input rows */
};

/* Panel p's floats into dst (k rows, ld floats apart); zeros past the last panel. */
static void dequantize_panel(const struct qweights *w, int64_t p, int64_t panels, int64_t k, float *dst, int64_t ld)
{
    if (p >= panels) {
        for (int64_t kk = 0; kk < k; ++kk) memset(dst + kk * ld, 0, NR * sizeof(float));
        return;
    }
    vec wv[NV], s[NV], z[NV];
    if (w->bits == 8) {
        const int8_t *panel = (const int8_t *)w->wp + p * k * NR;
        row_f32(w->scale + p * NR, s);
        for (int64_t kk = 0; kk < k; ++kk) {
            row_i8(panel + kk * NR, wv);
            for (int v = 0; v < NV; ++v) storev(dst + kk * ld + v * VW, wv[v] * s[v]);
        }
        return;
    }
    const uint8_t *panel = (const uint8_t *)w->wp + p * k * (NR / 2);
    for (int64_t g = 0; g < w->groups; ++g) {
        row_f32(w->scale + (p * w->groups + g) * NR, s);
        row_f32(w->zs + (p * w->groups + g) * NR, z);
        for (int64_t kk = g * w->gs; kk < (g + 1) * w->gs; kk += 2) {
            vec wv2[NV];
            rows_u4(panel + kk * (NR / 2), wv, wv2);
            for (int v = 0; v < NV; ++v) {
                storev(dst + kk * ld + v * VW, wv[v] * s[v] + z[v]);
                storev(dst + (kk + 1) * ld + v * VW, wv2[v] * s[v] + z[v]);
            }
        }
    }
}

#ifndef HAVE_GEMM
static inline __attribute__((always_inline)) void f32_block(
    const float *x, int64_t xs, const float *wf, int64_t k, const float *bias, float *out, int64_t os,
    int64_t ncols, const int mr)
{
    vec acc[MR][NV];
    const float *panel = wf;
    const int64_t k0 = 0, k1 = k;
    ACCUMULATE(row_f32, NR);
    store_rows(acc, bias, out, os, ncols, mr);
}

static void f32_rows(const float *x, int64_t xs, const float *wf, int64_t k, const float *bias, float *out,
                     int64_t os, int64_t ncols, int64_t m)
{
    int64_t r = 0;
    for (; r + MR <= m; r += MR) f32_block(x + r * xs, xs, wf, k, bias, out + r * os, os, ncols, MR);
    switch (m - r) {
    case 1: f32_block(x + r * xs, xs, wf, k, bias, out + r * os, os, ncols, 1); break;
    case 2: f32_block(x + r * xs, xs, wf, k, bias, out + r * os, os, ncols, 2); break;
    case 3: f32_block(x + r * xs, xs, wf, k, bias, out + r * os, os, ncols, 3); break;
    case 4: f32_block(x + r * xs, xs, wf, k, bias, out + r * os, os, ncols, 4); break;
    case 5: f32_block(x + r * xs, xs, wf, k, bias, out + r * os, os, ncols, 5); break;
    default: break;
    }
}
#endif

/* Many rows (prefill): each thread dequantizes a panel of gemm.c's width once, then runs every row
 * against it with gemm.c's float micro-kernel (or the plain one above where gemm.c is not built). */
static void many_rows(const struct qweights *w, const float *x, int64_t xs, const float *bias, float *out,
                      int64_t os, int64_t m, int64_t n, int64_t k, int num_threads)
{
    const int64_t panels = (n + NR - 1) / NR;
#ifdef HAVE_GEMM
    const int64_t width = bowline_gemm_panel_width();
#else
    const int64_t width = NR;
#endif
    const int64_t per = width / NR, wide = (n + width - 1) / width;
#pragma omp parallel num_threads(num_threads)
    {
        float *wf = malloc((size_t)k * width * sizeof(float));
#pragma omp for schedule(static)
        for (int64_t q = 0; q < wide; ++q) {
            const int64_t col = q * width, ncols = n - col < width ? n - col : width;
            for (int64_t j = 0; j < per; ++j) dequantize_panel(w, q * per + j, panels, k, wf + j * NR, width);
#ifdef HAVE_GEMM
            bowline_gemm_one_panel_f32(x, xs, wf, k, bias ? bias + col : 0, out + col, os, ncols, m);
#else
            f32_rows(x, xs, wf, k, bias ? bias + col : 0, out + col, os, ncols, m);
#endif
        }
        free(wf);
    }
}

/* ---------------------------------------------------------------- entry points */

/* x rows are xs floats apart, out rows os floats apart; scale [P * 16] floats; bias [N] or NULL. */
void bowline_q8_gemm_f32(const float *x, int64_t xs, const int8_t *wp, const float *scale, const float *bias,
                         float *out, int64_t os, int64_t m, int64_t n, int64_t k, int num_threads)
{
    const int64_t panels = (n + NR - 1) / NR;
    const int64_t blocks = (m + MR - 1) / MR, even = (m + blocks - 1) / blocks; /* 8 rows: 4 + 4, not 6 + 2 */
    if (m >= DEQ_M) {
        const struct qweights w = {8, wp, scale, 0, 0, 0};
        many_rows(&w, x, xs, bias, out, os, m, n, k, num_threads);
        return;
    }
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t p = 0; p < panels; ++p) {
        const int64_t col = p * NR, ncols = n - col < NR ? n - col : NR;
        for (int64_t r = 0; r < m; r += even) {
            const int64_t mr = m - r < even ? m - r : even;
            i8_rows(x + r * xs, xs, wp + p * k * NR, k, scale + col, bias ? bias + col : 0, out + r * os + col, os,
                    ncols, mr);
        }
    }
}

/* wp [P][K/2][16] bytes; scales, zs [P][groups][16] floats (zs = -zero * scale); gs = K / groups, even. */
void bowline_q4_gemm_f32(const float *x, int64_t xs, const uint8_t *wp, const float *scales, const float *zs,
                         const float *bias, float *out, int64_t os, int64_t m, int64_t n, int64_t k, int64_t gs,
                         int num_threads)
{
    const int64_t panels = (n + NR - 1) / NR, groups = k / gs;
    const int64_t blocks = (m + MR - 1) / MR, even = (m + blocks - 1) / blocks;
    if (m >= DEQ_M) {
        const struct qweights w = {4, wp, scales, zs, groups, gs};
        many_rows(&w, x, xs, bias, out, os, m, n, k, num_threads);
        return;
    }
    float *sums = malloc((size_t)(groups * m) * sizeof(float));
    for (int64_t r = 0; r < m; ++r)
        for (int64_t g = 0; g < groups; ++g) {
            float s = 0.0f;
            for (int64_t kk = g * gs; kk < (g + 1) * gs; ++kk) s += x[r * xs + kk];
            sums[r * groups + g] = s;
        }
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t p = 0; p < panels; ++p) {
        const int64_t col = p * NR, ncols = n - col < NR ? n - col : NR;
        for (int64_t r = 0; r < m; r += even) {
            const int64_t mr = m - r < even ? m - r : even;
            u4_rows(x + r * xs, xs, sums + r * groups, groups, wp + p * k * (NR / 2), scales + p * groups * NR,
                    zs + p * groups * NR, gs, bias ? bias + col : 0, out + r * os + col, os, ncols, mr);
        }
    }
    free(sums);
}

/* W8A8's activations: each row of x [M, K] rounded to int8 steps of its own scale max|x| / 127 and
 * written back as floats (x_q * s_x) to out [M, K] contiguous: the int8 product's input, exactly, in
 * one pass instead of torch's six small operations per call. Rounding is to nearest, ties to even,
 * as torch.round; built without -ffast-math so x / s is the correctly rounded division torch does
 * (a reciprocal multiply would move values next to a .5 to the other int8 step). */
__attribute__((optimize("no-fast-math"))) void bowline_quantize_rows_f32(const float *x, int64_t xs, float *out, int64_t m, int64_t k)
{
    for (int64_t r = 0; r < m; ++r) {
        const float *row = x + r * xs;
        float amax = 0.0f;
        for (int64_t i = 0; i < k; ++i) {
            const float a = row[i] < 0 ? -row[i] : row[i];
            amax = a > amax ? a : amax;
        }
        float scale = amax / 127.0f;
        scale = scale < 1e-12f ? 1e-12f : scale;
        for (int64_t i = 0; i < k; ++i) {
            float q = __builtin_nearbyintf(row[i] / scale);
            q = q < -128.0f ? -128.0f : (q > 127.0f ? 127.0f : q);
            out[r * k + i] = q * scale;
        }
    }
}
