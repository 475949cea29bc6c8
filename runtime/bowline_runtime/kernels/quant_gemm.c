/*
 * out[M, N] = x[M, K] @ dequant(w)[N, K]^T + bias, float32 activations, for quantized Linear layers:
 * int8 per output channel (weight-only or W8A8 after the caller quantizes x), 4-bit AWQ groups, and
 * float16 weights (a quantized checkpoint's LM head, kept in the half precision it was saved in).
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
 *   fp16: wp[P][K][16]           (IEEE half, widened exactly to float32 in registers)
 *   int4: wp[P][K/8][16] words   (word j of block i: column j's input rows 8i..8i+7; byte b holds row
 *                                 8i + b in its low nibble and row 8i + 4 + b in its high one; K and the
 *                                 group size multiples of 8)
 *         scales[P][G][16], zs[P][G][16] floats, zs = -zero * scale
 * Small row counts (decode) accumulate straight from the packed panel, up to MR = 6 rows at a time:
 * 4-bit on AVX-512 VNNI in integers (u4_vnni_block: x split into three int8 pieces per group, exact to
 * about float32's rounding), on AVX2 the same way for one row (u4_madd_row), elsewhere in floats, each row of a block widened with one shift, one mask
 * and one conversion (no shuffle). From DEQ_M rows on (prefill; 4-bit with VNNI from VNNI_DEQ_M),
 * each thread dequantizes one panel of gemm.c's width to floats (K x 64 floats on AVX-512, in L2) and
 * runs every row against it with gemm.c's micro-kernel, so the unpacking is paid once per panel, not
 * per row, and the product runs at float32's speed.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define NR 16
#define MR 6
#define DEQ_M 16
/* Input row r of an 8-row block of a 4-bit panel word: rows 0-3 in the low nibbles of bytes 0-3, rows 4-7
 * in their high nibbles. */
#define U4_SHIFT(r) (8 * ((r) & 3) + 4 * ((r) >> 2))

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

/* Input row r (0..7) of an 8-row block of a 4-bit panel: column j's word holds it in nibble U4_SHIFT(r) / 4. */
static inline __attribute__((always_inline)) void row_u4(const uint32_t *block, int r, vec *w)
{
    const __m512i v = _mm512_loadu_si512(block);
    w[0] = (vec)_mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srli_epi32(v, U4_SHIFT(r)), _mm512_set1_epi32(15)));
}
static inline __attribute__((always_inline)) void row_f16(const uint16_t *row, vec *w)
{
    w[0] = (vec)_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)row));
}
#elif defined(__AVX2__)
#include <immintrin.h>

#if defined(__F16C__)
#define HAVE_ROW_F16 1
static inline __attribute__((always_inline)) void row_f16(const uint16_t *row, vec *w)
{
    w[0] = (vec)_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)row));
    w[1] = (vec)_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(row + 8)));
}
#endif

static inline __attribute__((always_inline)) void row_i8(const int8_t *row, vec *w)
{
    /* two 8-byte loads that vpmovsxbd takes as its memory operand: no byte shift of a 16-byte load */
    w[0] = (vec)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)row)));
    w[1] = (vec)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(row + 8))));
}

static inline __attribute__((always_inline)) void row_u4(const uint32_t *block, int r, vec *w)
{
    const __m256i low = _mm256_set1_epi32(15);
    for (int v = 0; v < NV; ++v) {
        const __m256i b = _mm256_loadu_si256((const __m256i *)(block + v * VW));
        w[v] = (vec)_mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(b, U4_SHIFT(r)), low));
    }
}
#else
typedef int8_t v8i8 __attribute__((vector_size(8)));

static inline __attribute__((always_inline)) void row_i8(const int8_t *row, vec *w)
{
    v8i8 a, b;
    memcpy(&a, row, 8);
    memcpy(&b, row + 8, 8);
    w[0] = __builtin_convertvector(a, vec);
    w[1] = __builtin_convertvector(b, vec);
}

typedef int32_t vi32 __attribute__((vector_size(VW * 4)));

static inline __attribute__((always_inline)) void row_u4(const uint32_t *block, int r, vec *w)
{
    for (int v = 0; v < NV; ++v) {
        vi32 b;
        memcpy(&b, block + v * VW, sizeof b);
        w[v] = __builtin_convertvector((b >> U4_SHIFT(r)) & 15, vec);
    }
}
#endif

#if !defined(__AVX512F__) && !defined(HAVE_ROW_F16)
/* IEEE half to float, exactly (subnormals, infinities and NaN included), where no conversion instruction is. */
static inline float half_to_float(uint16_t h)
{
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 31u, man = h & 0x3ffu;
    uint32_t bits;
    if (exp == 31u) {
        bits = sign | 0x7f800000u | (man << 13);
    } else if (exp) {
        bits = sign | ((exp + 112u) << 23) | (man << 13);
    } else {
        float f = (float)man * (1.0f / 16777216.0f); /* man * 2^-24 */
        memcpy(&bits, &f, 4);
        bits |= sign;
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline __attribute__((always_inline)) void row_f16(const uint16_t *row, vec *w)
{
    for (int v = 0; v < NV; ++v)
        for (int j = 0; j < VW; ++j) w[v][j] = half_to_float(row[v * VW + j]);
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

/* The same over a 4-bit panel, whose input rows come in blocks of 8 (k0 and k1 multiples of 8). */
#define ACCUMULATE_U4()                                                                                     \
    do {                                                                                                    \
        vec acc2[MR][NV];                                                                                   \
        for (int m = 0; m < mr; ++m)                                                                        \
            for (int v = 0; v < NV; ++v) acc[m][v] = acc2[m][v] = splat(0.0f);                              \
        for (int64_t kk = k0; kk < k1; kk += 8) {                                                           \
            const uint32_t *block = panel + kk / 8 * NR;                                                    \
            _Pragma("GCC unroll 8") for (int r = 0; r < 8; ++r) {                                           \
                vec w[NV];                                                                                  \
                row_u4(block, r, w);                                                                        \
                _Pragma("GCC unroll 6") for (int m = 0; m < mr; ++m) {                                      \
                    const vec xb = splat(x[m * xs + kk + r]);                                               \
                    for (int v = 0; v < NV; ++v) {                                                          \
                        if (mr <= 2 && (r & 1))                                                             \
                            acc2[m][v] += xb * w[v];                                                        \
                        else                                                                                \
                            acc[m][v] += xb * w[v];                                                         \
                    }                                                                                       \
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

/* ---------------------------------------------------------------- float16 weights */

static inline __attribute__((always_inline)) void f16_block(
    const float *x, int64_t xs, const uint16_t *panel, int64_t k, const float *bias, float *out, int64_t os,
    int64_t ncols, const int mr)
{
    vec acc[MR][NV];
    const int64_t k0 = 0, k1 = k;
    ACCUMULATE(row_f16, NR);
    store_rows(acc, bias, out, os, ncols, mr);
}

static void f16_rows(const float *x, int64_t xs, const uint16_t *panel, int64_t k, const float *bias, float *out,
                     int64_t os, int64_t ncols, int64_t mr)
{
    switch (mr) {
    case 1: f16_block(x, xs, panel, k, bias, out, os, ncols, 1); break;
    case 2: f16_block(x, xs, panel, k, bias, out, os, ncols, 2); break;
    case 3: f16_block(x, xs, panel, k, bias, out, os, ncols, 3); break;
    case 4: f16_block(x, xs, panel, k, bias, out, os, ncols, 4); break;
    case 5: f16_block(x, xs, panel, k, bias, out, os, ncols, 5); break;
    default: f16_block(x, xs, panel, k, bias, out, os, ncols, MR); break;
    }
}

/* ---------------------------------------------------------------- 4-bit AWQ groups */

/* xsum[r * groups + g]: the sum of row r's inputs over group g (the zero point's share of the product). */
static inline __attribute__((always_inline)) void u4_block(
    const float *x, int64_t xs, const float *xsum, int64_t groups, const uint32_t *panel, const float *ps,
    const float *pz, int64_t gs, const float *bias, float *out, int64_t os, int64_t ncols, const int mr)
{
    vec tot[MR][NV];
    for (int m = 0; m < mr; ++m)
        for (int v = 0; v < NV; ++v) tot[m][v] = splat(0.0f);
    for (int64_t g = 0; g < groups; ++g) {
        vec acc[MR][NV];
        const int64_t k0 = g * gs, k1 = (g + 1) * gs;
        ACCUMULATE_U4();
        for (int v = 0; v < NV; ++v) {
            const vec s = loadv(ps + g * NR + v * VW), z = loadv(pz + g * NR + v * VW);
            for (int m = 0; m < mr; ++m) tot[m][v] += acc[m][v] * s + splat(xsum[m * groups + g]) * z;
        }
    }
    store_rows(tot, bias, out, os, ncols, mr);
}

static void u4_rows(const float *x, int64_t xs, const float *xsum, int64_t groups, const uint32_t *panel,
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

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define HAVE_VNNI 1
#elif defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512F__)
#define HAVE_U4_MADD 1
#endif

#if defined(HAVE_VNNI) || defined(HAVE_U4_MADD)
/* The 4-bit product in integers (VNNI's vpdpbusd: 64 unsigned-by-signed byte products a instruction;
 * AVX2's vpmaddubsw + vpmaddwd: 32 in two; against the float path's 16 multiplies after a shift, a mask
 * and a conversion for every 16 weights). Each row
 * of x is split per group into three int8 pieces, x = d (a + b / 254 + c / 254^2) with d = max|x| / 127:
 * the pieces carry 24 bits below the group's largest value, so what is lost is about float32's own
 * rounding of that value (|error| <= d / 2 / 254^2 = max|x| * 6e-8), and every sum of q * piece is
 * exact in int32. The weights' nibbles are already bytes after one mask (low nibbles: input rows 0-3 of
 * an 8-row block, 4 bytes per column word as vpdpbusd wants them) or one shift and mask (rows 4-7). */
#define SPLIT 254.0f
/* The largest group the float conversion of a piece's sum keeps exact: 1905 * gs < 2^24. */
#define VNNI_MAX_GS 8800
#define INT_ROWS(gs) ((gs) <= VNNI_MAX_GS)

/* One group of one row of x (gs floats) -> its three int8 pieces at qa, qa + k, qa + 2k and their d.
 * 0 where the group holds an inf or a nan (which the float path propagates and pieces cannot carry). */
static int split_group(const float *row, int64_t gs, int64_t k, int8_t *qa, float *d_out)
{
    uint32_t worst = 0;
    float amax = 0.0f;
    for (int64_t i = 0; i < gs; ++i) {
        uint32_t bits;
        memcpy(&bits, row + i, 4);
        bits &= 0x7FFFFFFFu;
        worst = bits > worst ? bits : worst;
        const float a = row[i] < 0 ? -row[i] : row[i];
        amax = a > amax ? a : amax;
    }
    if (worst >= 0x7F800000u) return 0;
    const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
    *d_out = amax / 127.0f;
    int8_t *qb = qa + k, *qc = qb + k;
    for (int64_t i = 0; i < gs; ++i) {
        float t = row[i] * inv;
        t = t > 127.0f ? 127.0f : (t < -127.0f ? -127.0f : t);
        const float a = __builtin_rintf(t), r1 = (t - a) * SPLIT, b = __builtin_rintf(r1);
        const float c = __builtin_rintf((r1 - b) * SPLIT);
        qa[i] = (int8_t)a;
        qb[i] = (int8_t)b;
        qc[i] = (int8_t)c;
    }
    return 1;
}

#endif

#ifdef HAVE_VNNI
#ifndef VNNI_DEQ_M
#define VNNI_DEQ_M 64
#endif
#define VNNI_ROWS(gs) INT_ROWS(gs)

/* acc += the 16 column words of w (4 bytes each) times the 4 bytes at x4, broadcast. Written in asm
 * because GCC 12 copies the accumulator of _mm512_dpbusd_epi32 to a fresh register and back on every
 * call (two moves a product, half the loop) and loads the broadcast separately instead of folding it. */
static inline __attribute__((always_inline)) __m512i dot4(__m512i acc, __m512i w, const int8_t *x4)
{
    __asm__("vpdpbusd %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(w), "m"(*(const int32_t *)x4));
    return acc;
}

static inline __attribute__((always_inline)) void u4_vnni_block(
    const int8_t *xq, int64_t k, const float *xd, const float *xsum, int64_t groups, const uint32_t *panel,
    const float *ps, const float *pz, int64_t gs, const float *bias, float *out, int64_t os, int64_t ncols,
    const int mr)
{
    const __m512i low = _mm512_set1_epi8(15);
    const __m512 step = _mm512_set1_ps(1.0f / SPLIT);
    vec tot[MR][NV];
    for (int m = 0; m < mr; ++m) tot[m][0] = splat(0.0f);
    for (int64_t g = 0; g < groups; ++g) {
        /* three pieces a row, and for 1-2 rows the high nibbles on chains of their own (H = 3) */
        const int H = mr <= 2 ? 3 : 0;
        __m512i acc[MR][6];
        for (int m = 0; m < mr; ++m)
            for (int p = 0; p < 3 + H; ++p) acc[m][p] = _mm512_setzero_si512();
        const uint32_t *blk = panel + g * gs / 8 * NR;
        const int8_t *xg = xq + g * gs;
        for (int64_t b = 0; b < gs / 8; ++b, blk += NR, xg += 8) {
            const __m512i v = _mm512_loadu_si512(blk);
            const __m512i lo = _mm512_and_si512(v, low), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
#pragma GCC unroll 6
            for (int m = 0; m < mr; ++m)
#pragma GCC unroll 3
                for (int p = 0; p < 3; ++p) {
                    const int8_t *xp = xg + (m * 3 + p) * k;
                    acc[m][p] = dot4(acc[m][p], lo, xp);
                    acc[m][p + H] = dot4(acc[m][p + H], hi, xp + 4);
                }
        }
        const __m512 s = _mm512_loadu_ps(ps + g * NR), z = _mm512_loadu_ps(pz + g * NR);
        for (int m = 0; m < mr; ++m) {
            __m512 piece[3];
            for (int p = 0; p < 3; ++p)
                piece[p] = _mm512_cvtepi32_ps(H ? _mm512_add_epi32(acc[m][p], acc[m][p + H]) : acc[m][p]);
            const __m512 xw = _mm512_mul_ps(_mm512_fmadd_ps(_mm512_fmadd_ps(piece[2], step, piece[1]), step, piece[0]),
                                            _mm512_set1_ps(xd[m * groups + g]));
            tot[m][0] = (vec)_mm512_fmadd_ps(xw, s, _mm512_fmadd_ps(_mm512_set1_ps(xsum[m * groups + g]), z, (__m512)tot[m][0]));
        }
    }
    store_rows(tot, bias, out, os, ncols, mr);
}

static void u4_vnni_rows(const int8_t *xq, int64_t k, const float *xd, const float *xsum, int64_t groups,
                         const uint32_t *panel, const float *ps, const float *pz, int64_t gs, const float *bias,
                         float *out, int64_t os, int64_t ncols, int64_t mr)
{
    switch (mr) {
    case 1: u4_vnni_block(xq, k, xd, xsum, groups, panel, ps, pz, gs, bias, out, os, ncols, 1); break;
    case 2: u4_vnni_block(xq, k, xd, xsum, groups, panel, ps, pz, gs, bias, out, os, ncols, 2); break;
    case 3: u4_vnni_block(xq, k, xd, xsum, groups, panel, ps, pz, gs, bias, out, os, ncols, 3); break;
    case 4: u4_vnni_block(xq, k, xd, xsum, groups, panel, ps, pz, gs, bias, out, os, ncols, 4); break;
    case 5: u4_vnni_block(xq, k, xd, xsum, groups, panel, ps, pz, gs, bias, out, os, ncols, 5); break;
    default: u4_vnni_block(xq, k, xd, xsum, groups, panel, ps, pz, gs, bias, out, os, ncols, MR); break;
    }
}
#endif

#ifdef HAVE_U4_MADD
/* AVX2 (no VNNI), one row: each 8-column half of a panel word block is one ymm, vpmaddubsw multiplies its
 * nibble bytes by 4 bytes of an x piece pairwise into 16-bit sums (at most 2 * 15 * 127 each, so the low
 * and high nibbles' sums add in 16 bits without overflow) and vpmaddwd by ones widens them to the
 * column's int32 sum: per piece 5 instructions per 64 weights against the float path's 16. The float
 * path shares its shift, mask and conversion between rows, so from 2 rows on it is as cheap and keeps
 * them (measured: 1024x512 at 2 rows 38/35 us float against 52/45 here).
 * The pieces of x are split by the threads that then run the panels. Split serially first, they paid
 * only on wide products (EPYC Zen 3, 2 threads, weights from memory, float path -> integers, us:
 * 3072x512 91/86 -> 65/55, 1024x512 30/29 -> 36/33). Split in parallel, three alternated rounds, the
 * 25th percentile of 300 calls: 1024x512 28/28/48 -> 25/25/25, 3072x512 71/94/74 -> 54/53/53, 512x1536
 * 36/36/37 -> 49/34/35, 16000x512 271/273/351 -> 296/215/227. */
#define U4_MADD_MAX_M 1

static inline __attribute__((always_inline)) __m256i bcast4(const int8_t *p)
{
    int32_t v;
    memcpy(&v, p, 4);
    return _mm256_set1_epi32(v);
}

static void u4_madd_row(const int8_t *xq, int64_t k, const float *xd, const float *xsum, int64_t groups,
                        const uint32_t *panel, const float *ps, const float *pz, int64_t gs, const float *bias,
                        float *out, int64_t ncols)
{
    const __m256i low = _mm256_set1_epi8(15), ones = _mm256_set1_epi16(1);
    const __m256 step = _mm256_set1_ps(1.0f / SPLIT);
    vec tot[MR][NV];
    for (int v = 0; v < NV; ++v) {
        __m256 t = _mm256_setzero_ps();
        for (int64_t g = 0; g < groups; ++g) {
            __m256i acc[3] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256()};
            const uint32_t *blk = panel + g * gs / 8 * NR + v * VW;
            const int8_t *xg = xq + g * gs;
            for (int64_t b = 0; b < gs / 8; ++b, blk += NR, xg += 8) {
                const __m256i w = _mm256_loadu_si256((const __m256i *)blk);
                const __m256i lo = _mm256_and_si256(w, low), hi = _mm256_and_si256(_mm256_srli_epi16(w, 4), low);
#pragma GCC unroll 3
                for (int p = 0; p < 3; ++p) {
                    const int8_t *xp = xg + p * k;
                    const __m256i s16 = _mm256_add_epi16(_mm256_maddubs_epi16(lo, bcast4(xp)),
                                                         _mm256_maddubs_epi16(hi, bcast4(xp + 4)));
                    acc[p] = _mm256_add_epi32(acc[p], _mm256_madd_epi16(s16, ones));
                }
            }
            const __m256 sc = _mm256_loadu_ps(ps + g * NR + v * VW), z = _mm256_loadu_ps(pz + g * NR + v * VW);
            const __m256 p0 = _mm256_cvtepi32_ps(acc[0]), p1 = _mm256_cvtepi32_ps(acc[1]),
                         p2 = _mm256_cvtepi32_ps(acc[2]);
            const __m256 xw = _mm256_mul_ps(_mm256_fmadd_ps(_mm256_fmadd_ps(p2, step, p1), step, p0),
                                            _mm256_set1_ps(xd[g]));
            t = _mm256_fmadd_ps(xw, sc, _mm256_fmadd_ps(_mm256_set1_ps(xsum[g]), z, t));
        }
        tot[0][v] = (vec)t;
    }
    store_rows(tot, bias, out, 0, ncols, 1);
}
#endif

/* The integer block for mr rows (VNNI: up to MR a block; AVX2: always 1, U4_MADD_MAX_M). */
#if defined(HAVE_VNNI) || defined(HAVE_U4_MADD)
static void u4_int_rows(const int8_t *xq, int64_t k, const float *xd, const float *xsum, int64_t groups,
                        const uint32_t *panel, const float *ps, const float *pz, int64_t gs, const float *bias,
                        float *out, int64_t os, int64_t ncols, int64_t mr)
{
#ifdef HAVE_VNNI
    u4_vnni_rows(xq, k, xd, xsum, groups, panel, ps, pz, gs, bias, out, os, ncols, mr);
#else
    (void)os;
    (void)mr;
    u4_madd_row(xq, k, xd, xsum, groups, panel, ps, pz, gs, bias, out, ncols);
#endif
}
#endif

#ifdef HAVE_VNNI
#define INT_MAX_M VNNI_DEQ_M
#elif defined(HAVE_U4_MADD)
#define INT_MAX_M U4_MADD_MAX_M
#else
#define INT_ROWS(gs) 0
#define INT_MAX_M 0
#endif

#ifndef HAVE_VNNI
#define VNNI_ROWS(gs) 0
#define VNNI_DEQ_M DEQ_M
#endif

/* ---------------------------------------------------------------- dequantized panels (many rows) */

/* Which quantized weight a many-row product dequantizes panel by panel. */
struct qweights {
    int bits;            /* 16 (float16), 8 or 4 */
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
    if (w->bits == 16) {
        const uint16_t *panel = (const uint16_t *)w->wp + p * k * NR;
        for (int64_t kk = 0; kk < k; ++kk) {
            row_f16(panel + kk * NR, wv);
            for (int v = 0; v < NV; ++v) storev(dst + kk * ld + v * VW, wv[v]);
        }
        return;
    }
    if (w->bits == 8) {
        const int8_t *panel = (const int8_t *)w->wp + p * k * NR;
        row_f32(w->scale + p * NR, s);
        for (int64_t kk = 0; kk < k; ++kk) {
            row_i8(panel + kk * NR, wv);
            for (int v = 0; v < NV; ++v) storev(dst + kk * ld + v * VW, wv[v] * s[v]);
        }
        return;
    }
    const uint32_t *panel = (const uint32_t *)w->wp + p * k / 8 * NR;
    for (int64_t g = 0; g < w->groups; ++g) {
        row_f32(w->scale + (p * w->groups + g) * NR, s);
        row_f32(w->zs + (p * w->groups + g) * NR, z);
        for (int64_t kk = g * w->gs; kk < (g + 1) * w->gs; kk += 8)
            for (int r = 0; r < 8; ++r) {
                row_u4(panel + kk / 8 * NR, r, wv);
                for (int v = 0; v < NV; ++v) storev(dst + (kk + r) * ld + v * VW, wv[v] * s[v] + z[v]);
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

/* int8 and float16 weights (one panel row per input row, no groups): below DEQ_M rows straight from the
 * panels, the rows split evenly into blocks of at most MR (8 rows: 4 + 4, not 6 + 2); from DEQ_M rows
 * through dequantized panels. */
static void per_row_gemm(const struct qweights *w, const float *x, int64_t xs, const float *bias, float *out,
                         int64_t os, int64_t m, int64_t n, int64_t k, int num_threads)
{
    const int64_t panels = (n + NR - 1) / NR;
    const int64_t blocks = (m + MR - 1) / MR, even = (m + blocks - 1) / blocks;
    if (m >= DEQ_M) {
        many_rows(w, x, xs, bias, out, os, m, n, k, num_threads);
        return;
    }
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t p = 0; p < panels; ++p) {
        const int64_t col = p * NR, ncols = n - col < NR ? n - col : NR;
        for (int64_t r = 0; r < m; r += even) {
            const int64_t mr = m - r < even ? m - r : even;
            const float *xr = x + r * xs, *b = bias ? bias + col : 0;
            float *o = out + r * os + col;
            if (w->bits == 16)
                f16_rows(xr, xs, (const uint16_t *)w->wp + p * k * NR, k, b, o, os, ncols, mr);
            else
                i8_rows(xr, xs, (const int8_t *)w->wp + p * k * NR, k, w->scale + col, b, o, os, ncols, mr);
        }
    }
}

/* x rows are xs floats apart, out rows os floats apart; scale [P * 16] floats; bias [N] or NULL. */
void bowline_q8_gemm_f32(const float *x, int64_t xs, const int8_t *wp, const float *scale, const float *bias,
                         float *out, int64_t os, int64_t m, int64_t n, int64_t k, int num_threads)
{
    const struct qweights w = {8, wp, scale, 0, 0, 0};
    per_row_gemm(&w, x, xs, bias, out, os, m, n, k, num_threads);
}

/* float16 weights wp [P][K][16] (IEEE half bits); bias [N] or NULL. */
void bowline_f16_gemm_f32(const float *x, int64_t xs, const uint16_t *wp, const float *bias, float *out, int64_t os,
                          int64_t m, int64_t n, int64_t k, int num_threads)
{
    const struct qweights w = {16, wp, 0, 0, 0, 0};
    per_row_gemm(&w, x, xs, bias, out, os, m, n, k, num_threads);
}

/* wp [P][K/2][16] bytes; scales, zs [P][groups][16] floats (zs = -zero * scale); gs = K / groups, even. */
void bowline_q4_gemm_f32(const float *x, int64_t xs, const uint32_t *wp, const float *scales, const float *zs,
                         const float *bias, float *out, int64_t os, int64_t m, int64_t n, int64_t k, int64_t gs,
                         int num_threads)
{
    const int64_t panels = (n + NR - 1) / NR, groups = k / gs;
    const int64_t blocks = (m + MR - 1) / MR, even = (m + blocks - 1) / blocks;
    if (m >= (VNNI_ROWS(gs) ? VNNI_DEQ_M : DEQ_M)) {
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
#if defined(HAVE_VNNI) || defined(HAVE_U4_MADD)
    if (INT_ROWS(gs) && m <= INT_MAX_M) {
        /* x [m, k] -> xq [m][3][k] pieces and xd [m][groups] their d, split by the same threads that then
         * run the panels (serially the split cost narrow products more than the integers saved) */
        int8_t *xq = malloc((size_t)(3 * m * k));
        float *xd = malloc((size_t)(groups * m) * sizeof(float));
        int split = 1;
#pragma omp parallel num_threads(num_threads)
        {
#pragma omp for schedule(static) reduction(&& : split)
            for (int64_t t = 0; t < m * groups; ++t) {
                const int64_t r = t / groups, g = t % groups;
                split = split_group(x + r * xs + g * gs, gs, k, xq + r * 3 * k + g * gs, xd + t) && split;
            }
            if (split) /* the same value in every thread: the reduction ends at the loop's barrier */
#pragma omp for schedule(static)
                for (int64_t p = 0; p < panels; ++p) {
                    const int64_t col = p * NR, ncols = n - col < NR ? n - col : NR;
                    for (int64_t r = 0; r < m; r += even) {
                        const int64_t mr = m - r < even ? m - r : even;
                        u4_int_rows(xq + r * 3 * k, k, xd + r * groups, sums + r * groups, groups,
                                    wp + p * k / 8 * NR, scales + p * groups * NR, zs + p * groups * NR, gs,
                                    bias ? bias + col : 0, out + r * os + col, os, ncols, mr);
                    }
                }
        }
        free(xq);
        free(xd);
        if (split) {
            free(sums);
            return;
        }
    }
#endif
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t p = 0; p < panels; ++p) {
        const int64_t col = p * NR, ncols = n - col < NR ? n - col : NR;
        for (int64_t r = 0; r < m; r += even) {
            const int64_t mr = m - r < even ? m - r : even;
            u4_rows(x + r * xs, xs, sums + r * groups, groups, wp + p * k / 8 * NR, scales + p * groups * NR,
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
