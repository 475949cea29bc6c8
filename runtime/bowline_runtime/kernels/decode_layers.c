/*
 * Every decoder layer of a decode step in one call: the packed decoder's layer loop, for steps where
 * each of the T tokens is one sequence's next token and every product is one of Bowline's C kernels.
 *
 * Why: per layer the Python loop makes ten calls into C (norm, q/k/v, rotary, cache write, attention,
 * o, norm, gate/up, SiLU, down) and around each some tensor bookkeeping (an output allocated, strides
 * checked, views taken, ctypes arguments converted): 5-20 us apiece, about 1 ms of a bench-model step
 * at 8 layers. At batch 1 that is a fifth of a 4-bit step and decides how much of the weights' smaller
 * size reaches the user. Here the same kernels run in the same order on the same buffers, so the
 * numbers are the Python loop's to the last bit; only the glue is gone.
 *
 * Per layer l (x, out [T, hidden], the stream `residual` [T, hidden] updated in place):
 *   x = rms_norm(residual)                  (l == 0: the embeddings)   or
 *   residual += out; x = rms_norm(residual) (the previous layer's down product)
 *   qkv = x @ Wqkv; rotary on its q and k heads; its k and v heads into the layer's cache
 *   attn = paged decode attention of its q heads;  out = attn @ Wo
 *   residual += out; x = rms_norm(residual); act = silu(gate) * up of x @ Wgate_up; out = act @ Wdown
 * The last layer's `out` is left for the caller's final norm (which adds it to the stream).
 */
#include <stdint.h>

/* The C products this file calls (gemm.c, quant_gemm.c, fused.c, paged_decode.c). gemm.c's float product
 * exists only where it builds (AVX-512, AVX2 + FMA); elsewhere no KernelLinear exists to ask for it. */
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#define HAVE_GEMM 1
void bowline_gemm_f32(const float *x, int64_t xs, const float *wp, const float *bias, float *out, int64_t os,
                      int64_t m, int64_t n, int64_t k, int num_threads);
#endif
void bowline_q8_gemm_f32(const float *x, int64_t xs, const int8_t *wp, const float *scale, const float *bias,
                         float *out, int64_t os, int64_t m, int64_t n, int64_t k, int num_threads);
void bowline_q4_gemm_f32(const float *x, int64_t xs, const uint32_t *wp, const float *scales, const float *zs,
                         const float *bias, float *out, int64_t os, int64_t m, int64_t n, int64_t k, int64_t gs,
                         int num_threads);
void bowline_f16_gemm_f32(const float *x, int64_t xs, const uint16_t *wp, const float *bias, float *out, int64_t os,
                          int64_t m, int64_t n, int64_t k, int num_threads);
void bowline_quantize_rows_f32(const float *x, int64_t xs, float *out, int64_t m, int64_t k);
void bowline_rms_norm_f32(const float *x, int64_t x_stride, float *residual, const float *w, float *out,
                          int64_t rows, int64_t dim, float eps, int num_threads);
void bowline_silu_mul_f32(const float *gate, int64_t gate_stride, const float *up, int64_t up_stride, float *out,
                          int64_t rows, int64_t dim, int num_threads);
void bowline_rotary_f32(float *x, int64_t row_stride, int64_t rows, int64_t heads, int64_t head_dim,
                        const float *cos_t, const float *sin_t, int64_t rot_dim, int num_threads);
void bowline_write_kv_f32(const float *k, int64_t k_stride, const float *v, int64_t v_stride, void *k_cache,
                          void *v_cache, int kv_kind, const int64_t *slots, int64_t tokens, int64_t kv_heads,
                          int64_t head_dim, int64_t num_slots, int num_threads);
void bowline_paged_decode_f32(const float *q, int64_t q_stride, const void *k_cache, const void *v_cache,
                              int kv_kind, const int64_t *tables, int64_t table_stride, const int64_t *lens, int64_t n,
                              int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, int64_t num_slots,
                              int64_t block_size, float scale, float *out, int num_threads);

/* Which C product a Linear is (kernels/decode_layers.py mirrors these numbers). */
enum { LINEAR_F32 = 0, LINEAR_INT8 = 1, LINEAR_W8A8 = 2, LINEAR_AWQ = 3, LINEAR_F16 = 4 };

/* One Linear's weights as its kernel layer holds them (the pointers of KernelProduct.weight_pointers). */
struct bl_linear {
    int64_t kind, out_features, in_features, group_size;
    const void *weight;
    const float *scale;      /* int8: per column; AWQ: per group and column */
    const float *zero_scale; /* AWQ: -zero * scale */
    const float *bias;       /* or NULL */
};

struct bl_layer {
    const float *in_norm, *post_norm;
    float in_eps, post_eps;
    void *k_cache, *v_cache; /* [Hkv, S, D] of the step's kv_kind */
    struct bl_linear qkv, o, gate_up, down;
};

/* The step: its shapes, attention inputs and the buffers every layer reuses (all float32 rows, contiguous). */
struct bl_step {
    int64_t tokens, hidden, heads, kv_heads, head_dim, intermediate, rot_dim;
    const float *cos, *sin;                 /* [T, rot_dim] */
    const int64_t *slots;                   /* [T] cache slot of each token */
    const int64_t *tables, *lens;           /* [T, table_stride] block tables, [T] context lengths */
    int64_t table_stride, num_slots, block_size;
    int64_t kv_kind;                        /* the cache's elements (kv_cache.h: KV_F32, KV_F16, KV_BF16) */
    float scale;
    float *residual;                        /* [T, hidden]: the embeddings in, the stream out */
    float *out;                             /* [T, hidden]: the last layer's down product out */
    float *x, *qkv, *attn, *gate_up, *act;  /* scratch: [T, hidden], [T, qkv], [T, H * D], [T, 2I], [T, I] */
    float *rounded;                         /* scratch for W8A8's rounded activations: [T, max in_features] */
};

static void linear(const struct bl_linear *l, const float *x, float *out, float *rounded, int64_t m, int nt)
{
    const int64_t n = l->out_features, k = l->in_features;
    switch (l->kind) {
#ifdef HAVE_GEMM
    case LINEAR_F32:
        bowline_gemm_f32(x, k, (const float *)l->weight, l->bias, out, n, m, n, k, nt);
        break;
#endif
    case LINEAR_W8A8:
        bowline_quantize_rows_f32(x, k, rounded, m, k);
        x = rounded;
        /* fall through */
    case LINEAR_INT8:
        bowline_q8_gemm_f32(x, k, (const int8_t *)l->weight, l->scale, l->bias, out, n, m, n, k, nt);
        break;
    case LINEAR_AWQ:
        bowline_q4_gemm_f32(x, k, (const uint32_t *)l->weight, l->scale, l->zero_scale, l->bias, out, n, m, n, k,
                            l->group_size, nt);
        break;
    case LINEAR_F16:
        bowline_f16_gemm_f32(x, k, (const uint16_t *)l->weight, l->bias, out, n, m, n, k, nt);
        break;
    }
}

void bowline_decode_layers_f32(const struct bl_layer *layers, int64_t num_layers, const struct bl_step *s,
                               int num_threads)
{
    const int64_t T = s->tokens, hidden = s->hidden, D = s->head_dim, I = s->intermediate;
    const int64_t q_width = s->heads * D, kv_width = s->kv_heads * D, qkv_width = q_width + 2 * kv_width;
    for (int64_t l = 0; l < num_layers; ++l) {
        const struct bl_layer *L = layers + l;
        bowline_rms_norm_f32(l == 0 ? s->residual : s->out, hidden, l == 0 ? 0 : s->residual, L->in_norm, s->x, T,
                             hidden, L->in_eps, num_threads);
        linear(&L->qkv, s->x, s->qkv, s->rounded, T, num_threads);
        bowline_rotary_f32(s->qkv, qkv_width, T, s->heads + s->kv_heads, D, s->cos, s->sin, s->rot_dim, num_threads);
        bowline_write_kv_f32(s->qkv + q_width, qkv_width, s->qkv + q_width + kv_width, qkv_width, L->k_cache,
                             L->v_cache, (int)s->kv_kind, s->slots, T, s->kv_heads, D, s->num_slots, num_threads);
        bowline_paged_decode_f32(s->qkv, qkv_width, L->k_cache, L->v_cache, (int)s->kv_kind, s->tables, s->table_stride, s->lens, T,
                                 s->heads, s->kv_heads, D, s->num_slots, s->block_size, s->scale, s->attn,
                                 num_threads);
        linear(&L->o, s->attn, s->out, s->rounded, T, num_threads);
        bowline_rms_norm_f32(s->out, hidden, s->residual, L->post_norm, s->x, T, hidden, L->post_eps, num_threads);
        linear(&L->gate_up, s->x, s->gate_up, s->rounded, T, num_threads);
        bowline_silu_mul_f32(s->gate_up, 2 * I, s->gate_up + I, 2 * I, s->act, T, I, num_threads);
        linear(&L->down, s->act, s->out, s->rounded, T, num_threads);
    }
}
