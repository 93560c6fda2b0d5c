/* The KV cache's element types, as the attention kernels read and write them in place.
 *
 * A layer's cache is codes k, v: (S, KV, D) of type kt / vt, and for the scaled types a
 * scale per (slot, KV head): ks, vs (S, KV) bf16. The value of element d of row
 * r = slot * KV + kvh is code(d) * scale(r):
 *   KV_F32, KV_BF16, KV_F16  the values themselves (scale 1);
 *   KV_I8   symmetric int8, scale = bf16(amax / 127), code = rint(x / scale);
 *   KV_FP8  e4m3 (OCP "fn": no infinities, 448 the largest), scale = bf16(amax / 448),
 *           code = e4m3(x / scale) rounded to nearest even.
 * Scales in bf16, not fp16: a head whose values are all under 0.008 (it happens) has
 * an fp16 scale in the subnormals, a few bits of precision, and its largest values
 * would clip by up to a tenth; bf16's 8 bits clip them by at most a quarter step.
 * A scale per token rather than per block: a block fills one token at a time, and a
 * scale fixed by its first tokens would clip the later ones, while rescaling would round
 * the stored codes twice. Every slot is then a function of its own token alone, so a
 * sequence's cache does not depend on what shares its batch or its block.
 *
 * The loaders return codes widened to fp32 (unscaled): the scale of a row factors out of
 * a dot product with it, so the kernels apply it once per key, not once per element.
 * fp8 loads through fp16: an e4m3 byte shifted into an fp16's exponent and mantissa is
 * its value times 2^-8 exactly (subnormals included), so kv_scale folds in the 2^8.
 *
 * The type codes are layers/kv_types.py's. */
#ifndef LLMOPT_KV_TYPES_H
#define LLMOPT_KV_TYPES_H
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "dtype.h"

enum { KV_F32 = 0, KV_BF16 = 1, KV_F16 = 2, KV_I8 = 3, KV_FP8 = 4 };

/* One layer's cache: codes and, for the scaled types, scales (NULL otherwise). */
typedef struct {
    void *k, *v;
    uint16_t *ks, *vs;
    int kt, vt;
} KVLayer;

static inline size_t kv_size(int t) { return t == KV_F32 ? 4 : t <= KV_F16 ? 2 : 1; }

static inline int kv_scaled(int t) { return t >= KV_I8; }

/* The codes of row r (slot * KV + kvh). */
static inline const void *kv_row(const void *base, int t, int64_t r, int D) {
    return (const char *)base + (size_t)r * D * kv_size(t);
}

/* The factor that turns row r's loaded codes into values. */
static inline float kv_scale(const uint16_t *s, int t, int64_t r) {
    if (!kv_scaled(t)) return 1.0f;
    const float x = bf16_to_f32(s[r]);
    return t == KV_FP8 ? x * 256.0f : x;
}

/* fp16 bits of an e4m3 code, whose value they hold times 2^-8. */
static inline uint16_t fp8_as_f16(uint8_t c) {
    return (uint16_t)(((c & 0x80) << 8) | ((c & 0x7f) << 7));
}

/* Code d of a row, widened (unscaled). */
static inline float kv_load1(const void *row, int t, int d) {
    switch (t) {
    case KV_BF16: return bf16_to_f32(((const uint16_t *)row)[d]);
    case KV_F16: return f16_to_f32(((const uint16_t *)row)[d]);
    case KV_I8: return (float)((const int8_t *)row)[d];
    case KV_FP8: return f16_to_f32(fp8_as_f16(((const uint8_t *)row)[d]));
    default: return ((const float *)row)[d];
    }
}

/* IEEE half of f, rounded to nearest even (as torch's .to(float16)). */
static inline uint16_t f32_to_f16(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    const uint16_t sign = (uint16_t)((x >> 16) & 0x8000);
    x &= 0x7fffffffu;
    if (x > 0x7f800000u) return sign | 0x7e00;  /* NaN */
    if (x >= 0x477ff000u) return sign | 0x7c00; /* 65520 and up round to infinity */
    if (x < 0x38800000u) {                      /* under 2^-14: a subnormal (steps of 2^-24) */
        float a;
        memcpy(&a, &x, 4);
        return sign | (uint16_t)nearbyintf(a * 16777216.0f);
    }
    x += 0x0fffu + ((x >> 13) & 1u);
    return sign | (uint16_t)((x >> 13) - (112u << 10));
}

/* e4m3 code of x, |x| <= 448, rounded to nearest even. */
static inline uint8_t f32_to_fp8(float x) {
    uint32_t b;
    memcpy(&b, &x, 4);
    const uint8_t sign = (uint8_t)((b >> 24) & 0x80);
    const float a = fabsf(x);
    if (a < 0.015625f) /* under 2^-6: a subnormal (steps of 2^-9; 8 steps is 2^-6, code 8) */
        return sign | (uint8_t)nearbyintf(a * 512.0f);
    b &= 0x7fffffffu;
    b += 0x7ffffu + ((b >> 20) & 1u); /* round to 3 mantissa bits */
    const uint32_t code = (((b >> 23) - 120u) << 3) | ((b >> 20) & 7u);
    return sign | (uint8_t)(code > 0x7e ? 0x7e : code);
}

/* Store x (D values) as row r: the codes and, for a scaled type, the row's scale. */
static inline void kv_store(void *base, uint16_t *scales, int t, int64_t r, const float *x,
                            int D) {
    void *row = (char *)base + (size_t)r * D * kv_size(t);
    if (!kv_scaled(t)) {
        for (int d = 0; d < D; d++) {
            if (t == KV_F32) ((float *)row)[d] = x[d];
            else if (t == KV_BF16) ((uint16_t *)row)[d] = f32_to_bf16(x[d]);
            else ((uint16_t *)row)[d] = f32_to_f16(x[d]);
        }
        return;
    }
    const float qmax = t == KV_I8 ? 127.0f : 448.0f;
    float amax = 0.0f;
    for (int d = 0; d < D; d++) amax = fabsf(x[d]) > amax ? fabsf(x[d]) : amax;
    scales[r] = f32_to_bf16(amax / qmax);
    const float s = bf16_to_f32(scales[r]);
    for (int d = 0; d < D; d++) {
        float c = s > 0.0f ? x[d] / s : 0.0f; /* a division, as the torch path's */
        c = c > qmax ? qmax : (c < -qmax ? -qmax : c);
        if (t == KV_I8) ((int8_t *)row)[d] = (int8_t)nearbyintf(c);
        else ((uint8_t *)row)[d] = f32_to_fp8(c);
    }
}

/* Calls f(args..., T) with T the compile-time constant equal to t: with f always
 * inlined, each type gets its own copy of f's loops, the type's branches resolved. */
#define KV_DISPATCH(t, f, ...)                                                                   \
    do {                                                                                         \
        switch (t) {                                                                             \
        case KV_BF16: f(__VA_ARGS__, KV_BF16); break;                                            \
        case KV_F16: f(__VA_ARGS__, KV_F16); break;                                              \
        case KV_I8: f(__VA_ARGS__, KV_I8); break;                                                \
        case KV_FP8: f(__VA_ARGS__, KV_FP8); break;                                              \
        default: f(__VA_ARGS__, KV_F32);                                                         \
        }                                                                                        \
    } while (0)

#ifdef __AVX2__
#include <immintrin.h>

/* Codes d .. d+7 of a row, widened (unscaled). */
static inline __attribute__((always_inline)) __m256 kv_load8(const void *row, int t, int d) {
    switch (t) {
    case KV_BF16: {
        const __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)row + d));
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    }
    case KV_F16:
        return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)row + d)));
    case KV_I8: {
        const __m128i c = _mm_loadl_epi64((const __m128i *)((const int8_t *)row + d));
        return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(c));
    }
    case KV_FP8: {
        const __m128i c = _mm_cvtepu8_epi16(_mm_loadl_epi64((const __m128i *)((const uint8_t *)row + d)));
        const __m128i h = _mm_or_si128(_mm_slli_epi16(_mm_and_si128(c, _mm_set1_epi16(0x80)), 8),
                                       _mm_slli_epi16(_mm_and_si128(c, _mm_set1_epi16(0x7f)), 7));
        return _mm256_cvtph_ps(h);
    }
    default: return _mm256_loadu_ps((const float *)row + d);
    }
}
#endif

#ifdef __AVX512F__
/* Codes d .. d+15 of a row, widened (unscaled). */
static inline __attribute__((always_inline)) __m512 kv_load16(const void *row, int t, int d) {
    switch (t) {
    case KV_BF16: {
        const __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)row + d));
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    case KV_F16:
        return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)row + d)));
    case KV_I8: {
        const __m128i c = _mm_loadu_si128((const __m128i *)((const int8_t *)row + d));
        return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(c));
    }
    case KV_FP8: {
        const __m256i c = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)((const uint8_t *)row + d)));
        const __m256i h = _mm256_or_si256(
            _mm256_slli_epi16(_mm256_and_si256(c, _mm256_set1_epi16(0x80)), 8),
            _mm256_slli_epi16(_mm256_and_si256(c, _mm256_set1_epi16(0x7f)), 7));
        return _mm512_cvtph_ps(h);
    }
    default: return _mm512_loadu_ps((const float *)row + d);
    }
}
#endif
#endif
