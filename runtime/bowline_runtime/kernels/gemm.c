/*
 * out[M, N] = x[M, K] @ w[N, K]^T + bias, float32, for the CPU's Linear layers (AVX-512 or AVX2 + FMA).
 *
 * Why not oneDNN alone: its fixed cost is ~15 us per call and its blocking suits large products, so
 * at decode sizes (a few rows) a product takes 1.2-1.3x the time of this loop; at prefill sizes (512
 * rows) the two are level. Measured on the bench model's products, 2 cores: 1 row 2.4 -> 1.9 ms,
 * 8 rows 3.3 -> 2.8, 16 rows 4.5 -> 3.9, 512 rows 73 -> 73 ms (all layers of one step).
 *
 * The weight is packed once into panels of NR = 64 output columns, each panel K rows of 64 floats
 * (zero-padded past N): a panel streams through memory in order while MR = 6 rows of x are
 * broadcast against it, 6 x 4 vector accumulators held in registers for the whole of K. Threads split
 * the panels. Up to 48 rows every panel is read once; beyond, rows go in chunks (96 rows; 144 on AVX2),
 * so a chunk's x stays in cache while the panels stream past it.
 *
 * Past MR rows a panel is read by several row blocks: the first from memory, the others from L2. Each
 * block then prefetches its share of the next panel, so the memory stream runs under the arithmetic
 * instead of after it (bench model, all of a step's products, AVX-512, cold weights: 8-32 rows
 * 1.06-1.10x faster; a single block, up to MR rows, streams alone: prefetching there competed with
 * its own loads).
 *
 * On AVX2 (16 vector registers) a block is 3 rows x 4 vectors up to 15 rows, and from 16 rows (prefill
 * chunks, large decode batches) 6 rows x 2 vectors over each half of the panel: 2 panel loads per 12
 * FMAs instead of 4, which the products past a few rows are bound by (AVX2 EPYC, the bench model's
 * products over 8 layers' weights, 2 threads, same run: 16 rows 1.07-1.13x, 48 1.12x, 128 1.17x,
 * 512 1.15-1.18x; below 16 the 3 x 4 blocks measured as fast or faster: 8 rows 0.83x with 6 x 2).
 * Past 48 rows (prefill) the AVX2 build packs x and slices K first (gemm_chunk_packed, below).
 *
 * Built for AVX-512 (NR = 64) or AVX2 + FMA (NR = 32, MR = 3, below), whichever -march=native targets;
 * elsewhere the symbols are absent and the engine keeps oneDNN.
 */
#include <stdint.h>
#include <stdlib.h>

/* Prefetch the next panel's cache lines (into L2) from `pf` up to `end`, `step` bytes of them per k step:
 * `due` is how far the prefetches should have got. Why bytes per step rather than whole lines: a share
 * of a few bytes per step, rounded up to a line, was issued in a burst over the block's first steps and
 * then stopped, so the memory stream ran ahead of the arithmetic and then idled; spread over all of K
 * it runs under it (AVX2 EPYC, the bench model's products, 2 threads, same run: 8 rows 1.08x, 12
 * 1.10x, 16 1.15x, 24 1.11x, 48 1.06x). */
#define PREFETCH_NEXT(pf, end, due, step)                                                          \
    do {                                                                                           \
        (due) += (step);                                                                           \
        for (; (pf) < (due) && (pf) < (end); (pf) += 64) _mm_prefetch((pf), _MM_HINT_T1);          \
    } while (0)

#ifdef __AVX512F__
#include <immintrin.h>

#define NR 64
#define MR 6
#define NV (NR / 16)
#define SMALL_M 48
#define MC 96

int64_t bowline_gemm_panel_width(void) { return NR; }

/* w [N, K] row-major (a torch Linear weight) -> wp [ceil(N / NR)][K][NR], zero-padded. */
void bowline_gemm_pack_f32(const float *w, int64_t n, int64_t k, float *wp, int num_threads)
{
    const int64_t panels = (n + NR - 1) / NR;
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t p = 0; p < panels; ++p)
        for (int64_t kk = 0; kk < k; ++kk)
            for (int64_t j = 0; j < NR; ++j) {
                const int64_t col = p * NR + j;
                wp[(p * k + kk) * NR + j] = col < n ? w[col * k + kk] : 0.0f;
            }
}

/* mr (<= MR, a constant after inlining) rows of x against one panel; ncols of its NR are real. */
static inline __attribute__((always_inline)) void rows_by_panel(
    const float *x, int64_t xs, const float *panel, int64_t k, const float *bias, float *out, int64_t os,
    int64_t ncols, const int mr, const char *pf, const char *pf_end, const int64_t pf_step)
{
    __m512 acc[MR][NV];
#pragma GCC unroll 8
    for (int m = 0; m < mr; ++m)
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) acc[m][v] = _mm512_setzero_ps();
    const char *due = pf;
    for (int64_t kk = 0; kk < k; ++kk) {
        PREFETCH_NEXT(pf, pf_end, due, pf_step);
        __m512 w[NV];
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) w[v] = _mm512_loadu_ps(panel + kk * NR + 16 * v);
#pragma GCC unroll 8
        for (int m = 0; m < mr; ++m) {
            const __m512 xb = _mm512_set1_ps(x[m * xs + kk]);
#pragma GCC unroll 4
            for (int v = 0; v < NV; ++v) acc[m][v] = _mm512_fmadd_ps(xb, w[v], acc[m][v]);
        }
    }
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
        const int64_t left = ncols - 16 * v;
        const __mmask16 mask = left >= 16 ? (__mmask16)0xFFFF : left <= 0 ? (__mmask16)0 : (__mmask16)((1u << left) - 1);
        const __m512 b = bias ? _mm512_maskz_loadu_ps(mask, bias + 16 * v) : _mm512_setzero_ps();
#pragma GCC unroll 8
        for (int m = 0; m < mr; ++m) _mm512_mask_storeu_ps(out + m * os + 16 * v, mask, _mm512_add_ps(acc[m][v], b));
    }
}

#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

/* AVX2 + FMA (16 ymm registers): panels of NR = 32 columns (4 vectors), MR = 3 rows -> 12 accumulators,
 * 1 broadcast and 3 weight vectors in registers (the 4th is an FMA's memory operand). Per k that is 4
 * weight loads and 3 broadcasts for 12 FMAs; 6 rows x 2 vectors (NR = 16) needs 8 loads for 12 and ran
 * 1.3-1.6x slower at 8 and 16 rows. NR stays a multiple of 16: quant_gemm.c fills gemm panels from its
 * own 16-column ones.
 *
 * The accumulators are only ever indexed by constants: an earlier version stored a partial panel's
 * accumulators through a buffer indexed by a loop variable, and GCC then wrote all 12 of them to the
 * stack on every k (12 stores per 12 FMAs), which made 8-16 rows 1.5x slower than oneDNN. */
#define NR 32
#define MR 3
#define NV (NR / 8)
#define SMALL_M 48
#define MC 144 /* rows per chunk past SMALL_M: the packed path below */

int64_t bowline_gemm_panel_width(void) { return NR; }

/* The lanes of a vector of 8 floats that hold one of the `left` real columns from its first (none if left <= 0):
 * the mask of a partial panel's masked loads and stores. */
static inline __attribute__((always_inline)) __m256i lane_mask(int64_t left)
{
    return _mm256_cmpgt_epi32(_mm256_set1_epi32((int)(left < 8 ? left : 8)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

void bowline_gemm_pack_f32(const float *w, int64_t n, int64_t k, float *wp, int num_threads)
{
    const int64_t panels = (n + NR - 1) / NR;
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t p = 0; p < panels; ++p)
        for (int64_t kk = 0; kk < k; ++kk)
            for (int64_t j = 0; j < NR; ++j) {
                const int64_t col = p * NR + j;
                wp[(p * k + kk) * NR + j] = col < n ? w[col * k + kk] : 0.0f;
            }
}

static inline __attribute__((always_inline)) void rows_by_panel(
    const float *x, int64_t xs, const float *panel, int64_t k, const float *bias, float *out, int64_t os,
    int64_t ncols, const int mr, const char *pf, const char *pf_end, const int64_t pf_step)
{
    __m256 acc[MR][NV];
#pragma GCC unroll 8
    for (int m = 0; m < mr; ++m)
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) acc[m][v] = _mm256_setzero_ps();
    const char *due = pf;
    int64_t kk = 0;
    if (mr == 1) {
        /* one row: even and odd k into separate sums, so 8 FMA chains hide the FMA latency */
        __m256 odd[NV];
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) odd[v] = _mm256_setzero_ps();
        for (; kk + 2 <= k; kk += 2) {
            PREFETCH_NEXT(pf, pf_end, due, 2 * pf_step);
            const __m256 x0 = _mm256_broadcast_ss(x + kk), x1 = _mm256_broadcast_ss(x + kk + 1);
#pragma GCC unroll 4
            for (int v = 0; v < NV; ++v) {
                acc[0][v] = _mm256_fmadd_ps(x0, _mm256_loadu_ps(panel + kk * NR + 8 * v), acc[0][v]);
                odd[v] = _mm256_fmadd_ps(x1, _mm256_loadu_ps(panel + (kk + 1) * NR + 8 * v), odd[v]);
            }
        }
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) acc[0][v] = _mm256_add_ps(acc[0][v], odd[v]);
    }
    for (; kk < k; ++kk) {
        PREFETCH_NEXT(pf, pf_end, due, pf_step);
        __m256 w[NV];
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) w[v] = _mm256_loadu_ps(panel + kk * NR + 8 * v);
#pragma GCC unroll 8
        for (int m = 0; m < mr; ++m) {
            const __m256 xb = _mm256_broadcast_ss(x + m * xs + kk);
#pragma GCC unroll 4
            for (int v = 0; v < NV; ++v) acc[m][v] = _mm256_fmadd_ps(xb, w[v], acc[m][v]);
        }
    }
    if (ncols == NR) {
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) {
            const __m256 b = bias ? _mm256_loadu_ps(bias + 8 * v) : _mm256_setzero_ps();
#pragma GCC unroll 8
            for (int m = 0; m < mr; ++m) _mm256_storeu_ps(out + m * os + 8 * v, _mm256_add_ps(acc[m][v], b));
        }
        return;
    }
    /* the last, partial panel: masked loads and stores, so nothing past column n is read or written */
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
        const int64_t left = ncols - 8 * v;
        const __m256i mask = lane_mask(left);
        const __m256 b = bias ? _mm256_maskload_ps(bias + 8 * v, mask) : _mm256_setzero_ps();
#pragma GCC unroll 8
        for (int m = 0; m < mr; ++m) _mm256_maskstore_ps(out + m * os + 8 * v, mask, _mm256_add_ps(acc[m][v], b));
    }
}

/* Past MR rows: blocks of up to MR_HALF = 6 rows against one half of the panel (16 columns) at a time, 6 x 2
 * accumulators, so each k step loads 2 vectors of the panel for 12 FMAs where 3 x 4 loads 4. */
#define MR_HALF 6
#define HALF_MIN_M 16

/* One k step of a 6 x 2 block: row m's x value at xk[m * m_stride] times the half panel's two vectors. */
static inline __attribute__((always_inline)) void half_fma(__m256 acc[][2], const float *xk, int64_t m_stride,
                                                          __m256 w0, __m256 w1, const int mr)
{
#pragma GCC unroll 8
    for (int m = 0; m < mr; ++m) {
        const __m256 xb = _mm256_broadcast_ss(xk + m * m_stride);
        acc[m][0] = _mm256_fmadd_ps(xb, w0, acc[m][0]);
        acc[m][1] = _mm256_fmadd_ps(xb, w1, acc[m][1]);
    }
}
static inline __attribute__((always_inline)) void rows_by_half(
    const float *x, int64_t xs, const float *half, int64_t k, const float *bias, float *out, int64_t os,
    int64_t ncols, const int mr, const char *pf, const char *pf_end, const int64_t pf_step)
{
    __m256 acc[MR_HALF][2];
#pragma GCC unroll 8
    for (int m = 0; m < mr; ++m) acc[m][0] = acc[m][1] = _mm256_setzero_ps();
    const char *due = pf;
    for (int64_t kk = 0; kk < k; ++kk) {
        PREFETCH_NEXT(pf, pf_end, due, pf_step);
        const __m256 w0 = _mm256_loadu_ps(half + kk * NR), w1 = _mm256_loadu_ps(half + kk * NR + 8);
        half_fma(acc, x + kk, xs, w0, w1, mr);
    }
#pragma GCC unroll 2
    for (int v = 0; v < 2; ++v) {
        const int64_t left = ncols - 8 * v;
        if (left <= 0) break;
        const __m256i mask = lane_mask(left);
        const __m256 b = bias ? _mm256_maskload_ps(bias + 8 * v, mask) : _mm256_setzero_ps();
#pragma GCC unroll 8
        for (int m = 0; m < mr; ++m) _mm256_maskstore_ps(out + m * os + 8 * v, mask, _mm256_add_ps(acc[m][v], b));
    }
}

static void half_block(const float *x, int64_t xs, const float *half, int64_t k, const float *bias, float *out,
                       int64_t os, int64_t ncols, int64_t mr, const char *pf, const char *pf_end, int64_t pf_step)
{
    switch (mr) {
    case 1: rows_by_half(x, xs, half, k, bias, out, os, ncols, 1, pf, pf_end, pf_step); break;
    case 2: rows_by_half(x, xs, half, k, bias, out, os, ncols, 2, pf, pf_end, pf_step); break;
    case 3: rows_by_half(x, xs, half, k, bias, out, os, ncols, 3, pf, pf_end, pf_step); break;
    case 4: rows_by_half(x, xs, half, k, bias, out, os, ncols, 4, pf, pf_end, pf_step); break;
    case 5: rows_by_half(x, xs, half, k, bias, out, os, ncols, 5, pf, pf_end, pf_step); break;
    default: rows_by_half(x, xs, half, k, bias, out, os, ncols, MR_HALF, pf, pf_end, pf_step); break;
    }
}

/* Prefill sizes (more than SMALL_M rows), BLIS's loop order: a chunk's MC rows are first packed in blocks
 * of PB = 6, each k's 6 values side by side, so a block's x is read in order rather than from 6 rows
 * K floats apart; K goes in slices of KC rows, so a half panel's slice (up to KC x 16 floats, 32 KB)
 * stays in L1 while every block of the chunk passes over it, and the chunk's packed slice (MC x KC
 * floats, 288 KB) in L2. Partial sums wait in `out` between slices. AVX2 EPYC, the bench model's
 * products over 8 layers' weights, 2 threads, rotated with the unpacked loop it replaced: 64-512 rows
 * 1.10-1.25x (512 rows 127 -> 141 GFLOP/s, 160 rows 102 -> 118); KC = 256 or MC = 96 measured within
 * the noise of these. */
#define PB 6
#define KC 512
static inline __attribute__((always_inline)) void packed_by_half(
    const float *ap, const float *half, int64_t kc, float *out, int64_t os, int64_t ncols, const int mr,
    int first, const float *bias)
{
    __m256 acc[PB][2];
    const int full = ncols == 16;
    const __m256i mask0 = lane_mask(ncols), mask1 = lane_mask(ncols - 8);
#pragma GCC unroll 8
    for (int m = 0; m < mr; ++m) {
        if (first) {
            acc[m][0] = acc[m][1] = _mm256_setzero_ps();
        } else if (full) {
            acc[m][0] = _mm256_loadu_ps(out + m * os);
            acc[m][1] = _mm256_loadu_ps(out + m * os + 8);
        } else {
            acc[m][0] = _mm256_maskload_ps(out + m * os, mask0);
            acc[m][1] = _mm256_maskload_ps(out + m * os + 8, mask1);
        }
    }
    for (int64_t kk = 0; kk < kc; ++kk) {
        const __m256 w0 = _mm256_loadu_ps(half + kk * NR), w1 = _mm256_loadu_ps(half + kk * NR + 8);
        half_fma(acc, ap + kk * PB, 1, w0, w1, mr);
    }
    if (bias) {
        const __m256 b0 = full ? _mm256_loadu_ps(bias) : _mm256_maskload_ps(bias, mask0);
        const __m256 b1 = full ? _mm256_loadu_ps(bias + 8) : _mm256_maskload_ps(bias + 8, mask1);
#pragma GCC unroll 8
        for (int m = 0; m < mr; ++m) acc[m][0] = _mm256_add_ps(acc[m][0], b0), acc[m][1] = _mm256_add_ps(acc[m][1], b1);
    }
#pragma GCC unroll 8
    for (int m = 0; m < mr; ++m) {
        if (full) {
            _mm256_storeu_ps(out + m * os, acc[m][0]);
            _mm256_storeu_ps(out + m * os + 8, acc[m][1]);
        } else {
            _mm256_maskstore_ps(out + m * os, mask0, acc[m][0]);
            _mm256_maskstore_ps(out + m * os + 8, mask1, acc[m][1]);
        }
    }
}

static void packed_block(const float *ap, const float *half, int64_t kc, float *out, int64_t os, int64_t ncols,
                         int64_t mr, int first, const float *bias)
{
    switch (mr) {
    case 1: packed_by_half(ap, half, kc, out, os, ncols, 1, first, bias); break;
    case 2: packed_by_half(ap, half, kc, out, os, ncols, 2, first, bias); break;
    case 3: packed_by_half(ap, half, kc, out, os, ncols, 3, first, bias); break;
    case 4: packed_by_half(ap, half, kc, out, os, ncols, 4, first, bias); break;
    case 5: packed_by_half(ap, half, kc, out, os, ncols, 5, first, bias); break;
    default: packed_by_half(ap, half, kc, out, os, ncols, PB, first, bias); break;
    }
}

/* mc rows of x (mc <= MC) against all panels, ap a buffer of MC * k floats for the packed rows. */
static void gemm_chunk_packed(const float *x, int64_t xs, const float *wp, const float *bias, float *out, int64_t os,
                              int64_t mc, int64_t n, int64_t k, float *ap, int num_threads)
{
    const int64_t panels = (n + NR - 1) / NR, blocks = (mc + PB - 1) / PB, slices = (k + KC - 1) / KC;
#pragma omp parallel num_threads(num_threads)
    {
#pragma omp for schedule(static)
        for (int64_t b = 0; b < blocks; ++b) {
            const int64_t r0 = b * PB, mr = mc - r0 < PB ? mc - r0 : PB;
            float *dst = ap + b * k * PB;
            for (int64_t kk = 0; kk < k; ++kk)
                for (int64_t r = 0; r < PB; ++r) dst[kk * PB + r] = r < mr ? x[(r0 + r) * xs + kk] : 0.0f;
        }
#pragma omp for schedule(static)
        for (int64_t p = 0; p < panels; ++p) {
            const int64_t col = p * NR, ncols = n - col < NR ? n - col : NR;
            const float *panel = wp + p * k * NR;
            for (int64_t s = 0; s < slices; ++s) {
                const int64_t k0 = s * KC, kc = k - k0 < KC ? k - k0 : KC;
                for (int h = 0; h < 2; ++h) {
                    const int64_t cols = ncols - 16 * h;
                    if (cols <= 0) break;
                    const float *b_slice = panel + k0 * NR + 16 * h;
                    const float *bias_h = bias && s == slices - 1 ? bias + col + 16 * h : 0;
                    for (int64_t b = 0; b < blocks; ++b) {
                        const int64_t r0 = b * PB, mr = mc - r0 < PB ? mc - r0 : PB;
                        packed_block(ap + (b * k + k0) * PB, b_slice, kc, out + r0 * os + col + 16 * h, os,
                                     cols < 16 ? cols : 16, mr, s == 0, bias_h);
                    }
                }
            }
        }
    }
}
#define HAVE_PACKED_LARGE 1
#endif

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
static void block(const float *x, int64_t xs, const float *panel, int64_t k, const float *bias, float *out,
                  int64_t os, int64_t ncols, int64_t mr, const char *pf, const char *pf_end, int64_t pf_step)
{
    switch (mr) {
    case 1: rows_by_panel(x, xs, panel, k, bias, out, os, ncols, 1, pf, pf_end, pf_step); break;
    case 2: rows_by_panel(x, xs, panel, k, bias, out, os, ncols, 2, pf, pf_end, pf_step); break;
#if MR > 3
    case 3: rows_by_panel(x, xs, panel, k, bias, out, os, ncols, 3, pf, pf_end, pf_step); break;
    case 4: rows_by_panel(x, xs, panel, k, bias, out, os, ncols, 4, pf, pf_end, pf_step); break;
    case 5: rows_by_panel(x, xs, panel, k, bias, out, os, ncols, 5, pf, pf_end, pf_step); break;
#endif
    default: rows_by_panel(x, xs, panel, k, bias, out, os, ncols, MR, pf, pf_end, pf_step); break;
    }
}

/* m rows against one panel, in blocks of at most MR rows whose sizes differ by at most one: with MR = 6,
 * 7 rows go 4 + 3, not 6 + 1; with MR = 3, 13 rows go 3 3 3 2 2, not 3 3 3 3 1. On AVX2 from
 * HALF_MIN_M rows, blocks of at most MR_HALF over each half of the panel: 16 rows go 6 5 5. (Slicing K so the
 * panel's slice stays in L1 while every block reads it was measured on AVX2 and was 5-25 % slower.) */
static void panel_rows(const float *x, int64_t xs, const float *panel, int64_t k, const float *bias, float *out,
                       int64_t os, int64_t ncols, int64_t m, int has_next)
{
    int64_t rows_per_block = MR;
    int halves = 1; /* 2: each block runs over the panel's two halves of 16 columns (rows_by_half) */
#ifdef MR_HALF
    if (m >= HALF_MIN_M) rows_per_block = MR_HALF, halves = 2;
#endif
    const int64_t blocks = (m + rows_per_block - 1) / rows_per_block, parts = blocks * halves;
    const char *next = (const char *)(panel + k * NR), *next_end = has_next ? next + k * NR * 4 : next;
    const int64_t slice = (k * NR * 4 + parts - 1) / parts; /* each part prefetches its share of the next panel */
    const int64_t step = blocks > 1 ? (slice + k - 1) / k : 0; /* bytes of it per k step */
    for (int64_t b = 0, r = 0; b < blocks; r += m / blocks + (b < m % blocks), ++b) {
        const int64_t mr = m / blocks + (b < m % blocks);
        for (int h = 0; h < halves; ++h) {
            const char *pf = next + (b * halves + h) * slice;
            const char *pf_end = pf + slice < next_end ? pf + slice : next_end;
#ifdef MR_HALF
            if (halves == 2) {
                const int64_t cols = ncols - 16 * h;
                if (cols <= 0) break;
                half_block(x + r * xs, xs, panel + 16 * h, k, bias ? bias + 16 * h : 0, out + r * os + 16 * h, os,
                           cols < 16 ? cols : 16, mr, pf, pf_end, step);
                continue;
            }
#endif
            block(x + r * xs, xs, panel, k, bias, out + r * os, os, ncols, mr, pf, pf_end, step);
        }
    }
}

/* x rows are xs floats apart, out rows os floats apart; bias may be NULL. */
void bowline_gemm_f32(const float *x, int64_t xs, const float *wp, const float *bias, float *out, int64_t os,
                      int64_t m, int64_t n, int64_t k, int num_threads)
{
#ifdef HAVE_PACKED_LARGE
    if (m > SMALL_M) {
        float *ap = aligned_alloc(64, (MC * k * sizeof(float) + 63) / 64 * 64);
        if (ap) { /* (without memory for the packed rows, the loop below serves) */
            for (int64_t m0 = 0; m0 < m; m0 += MC)
                gemm_chunk_packed(x + m0 * xs, xs, wp, bias, out + m0 * os, os, m - m0 < MC ? m - m0 : MC, n, k, ap,
                                  num_threads);
            free(ap);
            return;
        }
    }
#endif
    const int64_t panels = (n + NR - 1) / NR;
    const int64_t chunk = m <= SMALL_M ? m : MC;
    for (int64_t m0 = 0; m0 < m; m0 += chunk) {
        const int64_t mc = m - m0 < chunk ? m - m0 : chunk;
#pragma omp parallel for num_threads(num_threads) schedule(static)
        for (int64_t p = 0; p < panels; ++p) {
            const int64_t col = p * NR, ncols = n - col < NR ? n - col : NR;
            panel_rows(x + m0 * xs, xs, wp + p * k * NR, k, bias ? bias + col : 0, out + m0 * os + col, os, ncols, mc,
                       p + 1 < panels);
        }
    }
}

/* m rows of x against one packed panel (k rows of NR floats, ncols of them real), on the calling thread:
 * for kernels that make float panels on the fly (quant_gemm.c dequantizes a panel, then calls this). */
void bowline_gemm_one_panel_f32(const float *x, int64_t xs, const float *panel, int64_t k, const float *bias,
                                float *out, int64_t os, int64_t ncols, int64_t m)
{
    panel_rows(x, xs, panel, k, bias, out, os, ncols, m, 0);
}
#endif
