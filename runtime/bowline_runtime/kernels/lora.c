/*
 * Each row's LoRA update after one base projection, for every adapter of a step in one call
 * (Punica's BGMV/SGMV, float32): out[row] += (x[row] A_a^T) B_a^T for the adapter a of each row.
 *
 * Why a kernel: at decode sizes the update is bound by the bytes of A and B read, not by
 * arithmetic. torch's stacked slots read every slot's A and B for all rows, and the block-diagonal
 * B of a fused product (q/k/v, gate/up) is two-thirds or half zeros; a per-adapter loop of torch
 * products pays four dispatches, an allocation and an add per adapter and product. Here each
 * adapter's matrices are read once per step, its rows all processed against them, and only the
 * non-zero blocks of B (each module's own rank against its own columns) are touched. Rows of the
 * base model are simply absent from the row list.
 *
 * Layout, per adapter and product, as lora.delta packs it: A^T [in, R] (the modules' A side by side,
 * R = sum of their ranks) and B^T [R, out] (module m's block at rows k_m .. k_m + r_m, columns
 * c_m .. c_m + n_m). A step passes, per adapter present, a pointer to its table of such descriptors
 * (one per layer and product, TABLE_WIDTH int64 each) and its rows, grouped by adapter.
 *
 * Both halves are the same small product, C[rows, n] += P[rows, k] Q[k, n] with Q row-major: MR
 * rows of P broadcast against NR columns of Q held in accumulators over the whole of k. The shrink
 * (k = in, n = R) writes h [rows, R]; the expand (k = r_m, n = n_m) adds into out. Threads take
 * (adapter, row block) items for the shrink and (adapter, row block, module, column tile) items for
 * the expand, round robin. With tensor parallelism the row-parallel products (o, down) run the two
 * halves as separate calls around the all-reduce of h (mode 1, then 2).
 */
#include <stdint.h>
#include <string.h>
#include <omp.h>

#define MR 4
#define NR 64
/* Per (layer, product): R, A^T pointer, B^T pointer, B^T row stride, in, module count, then per
 * module (column offset, columns, rank offset, rank). R = 0: the adapter does not touch it. */
#define TABLE_WIDTH 18
#define MAX_MODULES 3
/* Below this many multiply-adds a call runs on the calling thread alone (a fork costs more). */
#define PARALLEL_MIN 32768

int64_t bowline_lora_table_width(void) { return TABLE_WIDTH; }

/* c[i][0:n] += sum_kk p[i][kk] * q[kk][0:n] for i < m (a constant after inlining), n <= NR. */
static inline __attribute__((always_inline)) void tile(
    const float *const *p, int64_t p_off, const float *q, int64_t ldq, int64_t k, float *const *c, int64_t c_off,
    int64_t n, const int m)
{
    float acc[MR][NR];
    for (int i = 0; i < m; ++i)
#pragma omp simd
        for (int j = 0; j < NR; ++j) acc[i][j] = 0.0f;
    if (n == NR) {
        for (int64_t kk = 0; kk < k; ++kk) {
            const float *qk = q + kk * ldq;
            for (int i = 0; i < m; ++i) {
                const float pv = p[i][p_off + kk];
#pragma omp simd
                for (int j = 0; j < NR; ++j) acc[i][j] += pv * qk[j];
            }
        }
    } else {
        for (int64_t kk = 0; kk < k; ++kk) {
            const float *qk = q + kk * ldq;
            for (int i = 0; i < m; ++i) {
                const float pv = p[i][p_off + kk];
#pragma omp simd
                for (int64_t j = 0; j < n; ++j) acc[i][j] += pv * qk[j];
            }
        }
    }
    for (int i = 0; i < m; ++i) {
        float *ci = c[i] + c_off;
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) ci[j] += acc[i][j];
    }
}

static void tile_rows(const float *const *p, int64_t p_off, const float *q, int64_t ldq, int64_t k, float *const *c,
                      int64_t c_off, int64_t n, int64_t m)
{
    switch (m) {
    case 4: tile(p, p_off, q, ldq, k, c, c_off, n, 4); break;
    case 3: tile(p, p_off, q, ldq, k, c, c_off, n, 3); break;
    case 2: tile(p, p_off, q, ldq, k, c, c_off, n, 2); break;
    default: tile(p, p_off, q, ldq, k, c, c_off, n, 1); break;
    }
}

/*
 * x: [*, in] rows x_stride apart; out: rows out_stride apart; h: [len(rows), h_stride] scratch.
 * tables[a]: adapter a's descriptor table (int64 [layers x products, TABLE_WIDTH]), entry `slot`
 * used; rows[offsets[a] .. offsets[a + 1]]: its rows. mode: 1 shrink into h, 2 expand from h, 3 both.
 */
void bowline_lora_f32(const float *x, int64_t x_stride, float *out, int64_t out_stride, int64_t slot,
                      int64_t num_adapters, const int64_t *const *tables, const int64_t *rows, const int64_t *offsets,
                      float *h, int64_t h_stride, int mode, int num_threads)
{
    int64_t work = 0; /* multiply-adds of the shrink and the expand */
    for (int64_t a = 0; a < num_adapters; ++a) {
        const int64_t *d = tables[a] + slot * TABLE_WIDTH;
        int64_t cols = 0;
        for (int64_t mod = 0; mod < d[5]; ++mod) cols += d[7 + 4 * mod] * d[9 + 4 * mod];
        work += (offsets[a + 1] - offsets[a]) * (d[0] * d[4] + cols);
    }
#pragma omp parallel num_threads(num_threads) if (work >= PARALLEL_MIN)
    {
        const int64_t tid = omp_get_thread_num(), nth = omp_get_num_threads();
        int64_t item = 0;
        if (mode & 1) {
            for (int64_t a = 0; a < num_adapters; ++a) {
                const int64_t *d = tables[a] + slot * TABLE_WIDTH;
                const int64_t r = d[0], in_dim = d[4];
                const float *at = (const float *)(intptr_t)d[1];
                for (int64_t b0 = offsets[a]; r && b0 < offsets[a + 1]; b0 += MR) {
                    const int64_t m = offsets[a + 1] - b0 < MR ? offsets[a + 1] - b0 : MR;
                    for (int64_t c0 = 0; c0 < r; c0 += NR, ++item) {
                        if (item % nth != tid) continue;
                        const int64_t n = r - c0 < NR ? r - c0 : NR;
                        const float *xp[MR];
                        float *hp[MR];
                        for (int64_t i = 0; i < m; ++i) {
                            xp[i] = x + rows[b0 + i] * x_stride;
                            hp[i] = h + (b0 + i) * h_stride;
                            memset(hp[i] + c0, 0, sizeof(float) * (size_t)n);
                        }
                        tile_rows(xp, 0, at + c0, r, in_dim, hp, c0, n, m);
                    }
                }
            }
        }
        if (mode == 3) {
#pragma omp barrier
        }
        if (mode & 2) {
            item = 0;
            for (int64_t a = 0; a < num_adapters; ++a) {
                const int64_t *d = tables[a] + slot * TABLE_WIDTH;
                const float *bt = (const float *)(intptr_t)d[2];
                const int64_t ldb = d[3], modules = d[0] ? d[5] : 0;
                for (int64_t b0 = offsets[a]; modules && b0 < offsets[a + 1]; b0 += MR) {
                    const int64_t m = offsets[a + 1] - b0 < MR ? offsets[a + 1] - b0 : MR;
                    const float *hp[MR];
                    float *op[MR];
                    for (int64_t i = 0; i < m; ++i) {
                        hp[i] = h + (b0 + i) * h_stride;
                        op[i] = out + rows[b0 + i] * out_stride;
                    }
                    for (int64_t mod = 0; mod < modules; ++mod) {
                        const int64_t *md = d + 6 + 4 * mod;
                        const int64_t col = md[0], cols = md[1], koff = md[2], rk = md[3];
                        for (int64_t c0 = 0; c0 < cols; c0 += NR, ++item) {
                            if (item % nth != tid) continue;
                            tile_rows(hp, koff, bt + koff * ldb + col + c0, ldb, rk, op, col + c0,
                                      cols - c0 < NR ? cols - c0 : NR, m);
                        }
                    }
                }
            }
        }
    }
}
