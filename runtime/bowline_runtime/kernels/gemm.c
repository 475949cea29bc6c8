/*
 * out[M, N] = x[M, K] @ w[N, K]^T + bias, float32, for the CPU's Linear layers (AVX-512).
 *
 * Why not oneDNN alone: its fixed cost is ~15 us per call and its blocking suits large products, so
 * at decode sizes (a few rows) a product takes 1.2-1.3x the time of this loop; at prefill sizes (512
 * rows) the two are level. Measured on the bench model's products, 2 cores: 1 row 2.4 -> 1.9 ms,
 * 8 rows 3.3 -> 2.8, 16 rows 4.5 -> 3.9, 512 rows 73 -> 73 ms (all layers of one step).
 *
 * The weight is packed once into panels of NR = 64 output columns, each panel K rows of 64 floats
 * (zero-padded past N): a panel streams through memory in order while MR = 6 rows of x are
 * broadcast against it, 6 x 4 vector accumulators held in registers for the whole of K. Threads split
 * the panels. Up to 48 rows every panel is read once; beyond, rows go in chunks of 96, so a chunk's x
 * stays in cache while the panels stream past it.
 *
 * Built for AVX-512 (NR = 64) or AVX2 + FMA (NR = 16, below), whichever -march=native targets;
 * elsewhere the symbols are absent and the engine keeps oneDNN.
 */
#include <stdint.h>

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
    int64_t ncols, const int mr)
{
    __m512 acc[MR][NV];
#pragma GCC unroll 8
    for (int m = 0; m < mr; ++m)
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) acc[m][v] = _mm512_setzero_ps();
    for (int64_t kk = 0; kk < k; ++kk) {
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

/* AVX2 + FMA (16 ymm registers): panels of NR = 16 columns, MR = 6 rows -> 12 accumulators, 2 weight
 * vectors and 1 broadcast = 15 registers. Narrower panels than AVX-512's keep one row's product a pure
 * stream of the weight: 2 loads and 2 FMAs per k. */
#define NR 16
#define MR 6
#define NV (NR / 8)
#define SMALL_M 48
#define MC 96

int64_t bowline_gemm_panel_width(void) { return NR; }

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
    int64_t ncols, const int mr)
{
    __m256 acc[MR][NV];
#pragma GCC unroll 8
    for (int m = 0; m < mr; ++m)
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) acc[m][v] = _mm256_setzero_ps();
    for (int64_t kk = 0; kk < k; ++kk) {
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
    /* the last, partial panel: through a buffer, so nothing past column n is read or written */
    float tmp[NR];
    for (int m = 0; m < mr; ++m) {
        for (int v = 0; v < NV; ++v) _mm256_storeu_ps(tmp + 8 * v, acc[m][v]);
        for (int64_t j = 0; j < ncols; ++j) out[m * os + j] = tmp[j] + (bias ? bias[j] : 0.0f);
    }
}
#endif

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
static void block(const float *x, int64_t xs, const float *panel, int64_t k, const float *bias, float *out,
                  int64_t os, int64_t ncols, int64_t mr)
{
    switch (mr) {
    case 1: rows_by_panel(x, xs, panel, k, bias, out, os, ncols, 1); break;
    case 2: rows_by_panel(x, xs, panel, k, bias, out, os, ncols, 2); break;
    case 3: rows_by_panel(x, xs, panel, k, bias, out, os, ncols, 3); break;
    case 4: rows_by_panel(x, xs, panel, k, bias, out, os, ncols, 4); break;
    case 5: rows_by_panel(x, xs, panel, k, bias, out, os, ncols, 5); break;
    default: rows_by_panel(x, xs, panel, k, bias, out, os, ncols, MR); break;
    }
}

/* x rows are xs floats apart, out rows os floats apart; bias may be NULL. */
void bowline_gemm_f32(const float *x, int64_t xs, const float *wp, const float *bias, float *out, int64_t os,
                      int64_t m, int64_t n, int64_t k, int num_threads)
{
    const int64_t panels = (n + NR - 1) / NR;
    const int64_t chunk = m <= SMALL_M ? m : MC;
    for (int64_t m0 = 0; m0 < m; m0 += chunk) {
        const int64_t mc = m - m0 < chunk ? m - m0 : chunk;
        /* rows split evenly into blocks of at most MR: 7 rows go 4 + 3, not 6 + 1 */
        const int64_t blocks = (mc + MR - 1) / MR, even = (mc + blocks - 1) / blocks;
#pragma omp parallel for num_threads(num_threads) schedule(static)
        for (int64_t p = 0; p < panels; ++p) {
            const int64_t col = p * NR, ncols = n - col < NR ? n - col : NR;
            for (int64_t r = m0; r < m0 + mc; r += even) {
                const int64_t mr = m0 + mc - r < even ? m0 + mc - r : even;
                block(x + r * xs, xs, wp + p * k * NR, k, bias ? bias + col : 0, out + r * os + col, os, ncols, mr);
            }
        }
    }
}

/* m rows of x against one packed panel (k rows of NR floats, ncols of them real), on the calling thread:
 * for kernels that make float panels on the fly (quant_gemm.c dequantizes a panel, then calls this). */
void bowline_gemm_one_panel_f32(const float *x, int64_t xs, const float *panel, int64_t k, const float *bias,
                                float *out, int64_t os, int64_t ncols, int64_t m)
{
    const int64_t blocks = (m + MR - 1) / MR, even = (m + blocks - 1) / blocks;
    for (int64_t r = 0; r < m; r += even) {
        const int64_t mr = m - r < even ? m - r : even;
        block(x + r * xs, xs, panel, k, bias, out + r * os, os, ncols, mr);
    }
}
#endif
