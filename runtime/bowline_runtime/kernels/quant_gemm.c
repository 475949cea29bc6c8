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
 * Portable C with GCC vector extensions (8-float vectors): the compiler lowers them to whatever
 * -march=native offers (AVX2/AVX-512 ymm registers, NEON pairs, SSE pairs), so the kernel is the same
 * arithmetic and correct on every CPU; only its speed differs.
 *
 * Weights arrive packed once (by kernels/quant_cpu.py) in panels of NR = 16 output columns:
 *   int8: wp[P][K][16]           (int8, column j of the panel at byte j)
 *   int4: wp[P][K][8]            (byte j: column j in the low nibble, column j + 8 in the high nibble)
 *         scales[P][G][16], zs[P][G][16] floats, zs = -zero * scale
 * Small row counts (decode) accumulate straight from the packed panel, MR = 4 rows at a time. From
 * DEQ_M rows on (prefill), each thread dequantizes a panel to floats once into a buffer (K x 16
 * floats, in L2) and runs every row against it, so the unpacking is paid once per panel, not per row.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define NR 16
#define MR 4
#define DEQ_M 16

typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
typedef uint8_t v8u8 __attribute__((vector_size(8)));
typedef int8_t v8i8 __attribute__((vector_size(8)));

int64_t bowline_quant_panel_width(void) { return NR; }

static inline v8f splat(float v) { return (v8f){v, v, v, v, v, v, v, v}; }

static inline v8f loadf(const float *p)
{
    v8f v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline void storef(float *p, v8f v) { memcpy(p, &v, sizeof v); }

/* The 16 weights of one panel row as two float vectors (columns 0-7 and 8-15). */
static inline __attribute__((always_inline)) void row_i8(const int8_t *row, v8f *lo, v8f *hi)
{
    v8i8 a, b;
    memcpy(&a, row, 8);
    memcpy(&b, row + 8, 8);
    *lo = __builtin_convertvector(a, v8f);
    *hi = __builtin_convertvector(b, v8f);
}

static inline __attribute__((always_inline)) void row_u4(const uint8_t *row, v8f *lo, v8f *hi)
{
    v8u8 b;
    memcpy(&b, row, 8);
    *lo = __builtin_convertvector(b & (uint8_t)15, v8f);
    *hi = __builtin_convertvector(b >> 4, v8f);
}

/* Store mr rows of a panel's result: ncols of its 16 columns are real; bias may be NULL. */
static inline __attribute__((always_inline)) void store_rows(
    v8f tot[MR][2], const float *bias, float *out, int64_t os, int64_t ncols, const int mr)
{
    for (int m = 0; m < mr; ++m) {
        float tmp[NR];
        storef(tmp, tot[m][0]);
        storef(tmp + 8, tot[m][1]);
        for (int64_t j = 0; j < ncols; ++j) out[m * os + j] = tmp[j] + (bias ? bias[j] : 0.0f);
    }
}

/* ---------------------------------------------------------------- int8, per output channel */

static inline __attribute__((always_inline)) void i8_block(
    const float *x, int64_t xs, const int8_t *panel, int64_t k, const float *scale, const float *bias,
    float *out, int64_t os, int64_t ncols, const int mr)
{
    v8f acc[MR][2];
    for (int m = 0; m < mr; ++m) acc[m][0] = acc[m][1] = splat(0.0f);
    for (int64_t kk = 0; kk < k; ++kk) {
        v8f lo, hi;
        row_i8(panel + kk * NR, &lo, &hi);
#pragma GCC unroll 4
        for (int m = 0; m < mr; ++m) {
            const v8f xb = splat(x[m * xs + kk]);
            acc[m][0] += xb * lo;
            acc[m][1] += xb * hi;
        }
    }
    const v8f s0 = loadf(scale), s1 = loadf(scale + 8);
    for (int m = 0; m < mr; ++m) {
        acc[m][0] *= s0;
        acc[m][1] *= s1;
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
    default: i8_block(x, xs, panel, k, scale, bias, out, os, ncols, MR); break;
    }
}

/* ---------------------------------------------------------------- dequantized panel (many rows) */

static inline __attribute__((always_inline)) void f32_block(
    const float *x, int64_t xs, const float *wf, int64_t k, const float *bias, float *out, int64_t os,
    int64_t ncols, const int mr)
{
    v8f acc[MR][2];
    for (int m = 0; m < mr; ++m) acc[m][0] = acc[m][1] = splat(0.0f);
    for (int64_t kk = 0; kk < k; ++kk) {
        const v8f lo = loadf(wf + kk * NR), hi = loadf(wf + kk * NR + 8);
#pragma GCC unroll 4
        for (int m = 0; m < mr; ++m) {
            const v8f xb = splat(x[m * xs + kk]);
            acc[m][0] += xb * lo;
            acc[m][1] += xb * hi;
        }
    }
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
    default: break;
    }
}

/* x rows are xs floats apart, out rows os floats apart; scale [P * 16] floats; bias [N] or NULL. */
void bowline_q8_gemm_f32(const float *x, int64_t xs, const int8_t *wp, const float *scale, const float *bias,
                         float *out, int64_t os, int64_t m, int64_t n, int64_t k, int num_threads)
{
    const int64_t panels = (n + NR - 1) / NR;
    if (m < DEQ_M) {
#pragma omp parallel for num_threads(num_threads) schedule(static)
        for (int64_t p = 0; p < panels; ++p) {
            const int64_t col = p * NR, ncols = n - col < NR ? n - col : NR;
            for (int64_t r = 0; r < m; r += MR) {
                const int64_t mr = m - r < MR ? m - r : MR;
                i8_rows(x + r * xs, xs, wp + p * k * NR, k, scale + col, bias ? bias + col : 0, out + r * os + col,
                        os, ncols, mr);
            }
        }
        return;
    }
#pragma omp parallel num_threads(num_threads)
    {
        float *wf = malloc((size_t)k * NR * sizeof(float));
#pragma omp for schedule(static)
        for (int64_t p = 0; p < panels; ++p) {
            const int64_t col = p * NR, ncols = n - col < NR ? n - col : NR;
            const int8_t *panel = wp + p * k * NR;
            const v8f s0 = loadf(scale + col), s1 = loadf(scale + col + 8);
            for (int64_t kk = 0; kk < k; ++kk) {
                v8f lo, hi;
                row_i8(panel + kk * NR, &lo, &hi);
                storef(wf + kk * NR, lo * s0);
                storef(wf + kk * NR + 8, hi * s1);
            }
            f32_rows(x, xs, wf, k, bias ? bias + col : 0, out + col, os, ncols, m);
        }
        free(wf);
    }
}

/* ---------------------------------------------------------------- 4-bit AWQ groups */

/* xsum[r * groups + g]: the sum of row r's inputs over group g (the zero point's share of the product). */
static inline __attribute__((always_inline)) void u4_block(
    const float *x, int64_t xs, const float *xsum, int64_t groups, const uint8_t *panel, const float *ps,
    const float *pz, int64_t k, int64_t gs, const float *bias, float *out, int64_t os, int64_t ncols, const int mr)
{
    v8f tot[MR][2];
    for (int m = 0; m < mr; ++m) tot[m][0] = tot[m][1] = splat(0.0f);
    for (int64_t g = 0; g < groups; ++g) {
        v8f acc[MR][2];
        for (int m = 0; m < mr; ++m) acc[m][0] = acc[m][1] = splat(0.0f);
        for (int64_t kk = g * gs; kk < (g + 1) * gs; ++kk) {
            v8f lo, hi;
            row_u4(panel + kk * (NR / 2), &lo, &hi);
#pragma GCC unroll 4
            for (int m = 0; m < mr; ++m) {
                const v8f xb = splat(x[m * xs + kk]);
                acc[m][0] += xb * lo;
                acc[m][1] += xb * hi;
            }
        }
        const v8f s0 = loadf(ps + g * NR), s1 = loadf(ps + g * NR + 8);
        const v8f z0 = loadf(pz + g * NR), z1 = loadf(pz + g * NR + 8);
        for (int m = 0; m < mr; ++m) {
            const v8f xg = splat(xsum[m * groups + g]);
            tot[m][0] += acc[m][0] * s0 + xg * z0;
            tot[m][1] += acc[m][1] * s1 + xg * z1;
        }
    }
    store_rows(tot, bias, out, os, ncols, mr);
}

static void u4_rows(const float *x, int64_t xs, const float *xsum, int64_t groups, const uint8_t *panel,
                    const float *ps, const float *pz, int64_t k, int64_t gs, const float *bias, float *out,
                    int64_t os, int64_t ncols, int64_t mr)
{
    switch (mr) {
    case 1: u4_block(x, xs, xsum, groups, panel, ps, pz, k, gs, bias, out, os, ncols, 1); break;
    case 2: u4_block(x, xs, xsum, groups, panel, ps, pz, k, gs, bias, out, os, ncols, 2); break;
    case 3: u4_block(x, xs, xsum, groups, panel, ps, pz, k, gs, bias, out, os, ncols, 3); break;
    default: u4_block(x, xs, xsum, groups, panel, ps, pz, k, gs, bias, out, os, ncols, MR); break;
    }
}

/* wp [P][K][8] bytes; scales, zs [P][groups][16] floats (zs = -zero * scale); gs = K / groups. */
void bowline_q4_gemm_f32(const float *x, int64_t xs, const uint8_t *wp, const float *scales, const float *zs,
                         const float *bias, float *out, int64_t os, int64_t m, int64_t n, int64_t k, int64_t gs,
                         int num_threads)
{
    const int64_t panels = (n + NR - 1) / NR, groups = k / gs;
    if (m < DEQ_M) {
        float xsum[DEQ_M * 512];
        float *sums = groups * m <= DEQ_M * 512 ? xsum : malloc((size_t)(groups * m) * sizeof(float));
        for (int64_t r = 0; r < m; ++r)
            for (int64_t g = 0; g < groups; ++g) {
                float s = 0.0f;
                for (int64_t kk = g * gs; kk < (g + 1) * gs; ++kk) s += x[r * xs + kk];
                sums[r * groups + g] = s;
            }
#pragma omp parallel for num_threads(num_threads) schedule(static)
        for (int64_t p = 0; p < panels; ++p) {
            const int64_t col = p * NR, ncols = n - col < NR ? n - col : NR;
            for (int64_t r = 0; r < m; r += MR) {
                const int64_t mr = m - r < MR ? m - r : MR;
                u4_rows(x + r * xs, xs, sums + r * groups, groups, wp + p * k * (NR / 2), scales + p * groups * NR,
                        zs + p * groups * NR, k, gs, bias ? bias + col : 0, out + r * os + col, os, ncols, mr);
            }
        }
        if (sums != xsum) free(sums);
        return;
    }
#pragma omp parallel num_threads(num_threads)
    {
        float *wf = malloc((size_t)k * NR * sizeof(float));
#pragma omp for schedule(static)
        for (int64_t p = 0; p < panels; ++p) {
            const int64_t col = p * NR, ncols = n - col < NR ? n - col : NR;
            const uint8_t *panel = wp + p * k * (NR / 2);
            for (int64_t g = 0; g < groups; ++g) {
                const float *ps = scales + (p * groups + g) * NR, *pz = zs + (p * groups + g) * NR;
                const v8f s0 = loadf(ps), s1 = loadf(ps + 8), z0 = loadf(pz), z1 = loadf(pz + 8);
                for (int64_t kk = g * gs; kk < (g + 1) * gs; ++kk) {
                    v8f lo, hi;
                    row_u4(panel + kk * (NR / 2), &lo, &hi);
                    storef(wf + kk * NR, lo * s0 + z0);
                    storef(wf + kk * NR + 8, hi * s1 + z1);
                }
            }
            f32_rows(x, xs, wf, k, bias ? bias + col : 0, out + col, os, ncols, m);
        }
        free(wf);
    }
}
