/*
 * The KV cache's element types (--kv-cache-dtype): float32, float16 or bfloat16.
 *
 * Why a half-precision cache for a float32 model: decode attention reads every cached key and value
 * once per step, and at long contexts those reads outweigh the weights (16 contexts of ~700 tokens of
 * the bench model: ~180 MB of float32 cache against 133 MB of weights a step). Two bytes an element
 * halve that traffic and double the tokens a given cache memory holds. Elements are converted to
 * float32 as they are loaded and every sum stays float32; only the stored keys and values are rounded
 * (to nearest even).
 */
#ifndef BOWLINE_KV_CACHE_H
#define BOWLINE_KV_CACHE_H

#include <stdint.h>
#include <string.h>

enum { KV_F32 = 0, KV_F16 = 1, KV_BF16 = 2 };

static inline int64_t kv_elem_size(int kind) { return kind == KV_F32 ? 4 : 2; }

static inline float kv_bf16_to_f32(uint16_t h)
{
    const uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint16_t kv_f32_to_bf16(float f)
{
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* NaN stays NaN */
    u += 0x7fffu + ((u >> 16) & 1u);                                           /* round to nearest even */
    return (uint16_t)(u >> 16);
}

static inline float kv_f16_to_f32(uint16_t h)
{
    _Float16 x;
    memcpy(&x, &h, sizeof x);
    return (float)x;
}

static inline uint16_t kv_f32_to_f16(float f)
{
    const _Float16 x = (_Float16)f;
    uint16_t h;
    memcpy(&h, &x, sizeof h);
    return h;
}

/* n elements of a cache row starting at `row` -> float32 dst. */
static inline void kv_load_row(const char *row, int kind, int64_t n, float *dst)
{
    if (kind == KV_F32) {
        memcpy(dst, row, sizeof(float) * (size_t)n);
        return;
    }
    const uint16_t *h = (const uint16_t *)row;
    if (kind == KV_F16) {
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) dst[i] = kv_f16_to_f32(h[i]);
    } else {
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) dst[i] = kv_bf16_to_f32(h[i]);
    }
}

/* n float32 values -> a cache row starting at `row`. */
static inline void kv_store_row(char *row, int kind, int64_t n, const float *src)
{
    if (kind == KV_F32) {
        memcpy(row, src, sizeof(float) * (size_t)n);
        return;
    }
    uint16_t *h = (uint16_t *)row;
    if (kind == KV_F16) {
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) h[i] = kv_f32_to_f16(src[i]);
    } else {
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) h[i] = kv_f32_to_bf16(src[i]);
    }
}

#endif
