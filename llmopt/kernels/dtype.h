/* Element access for kernels that take fp32 or bf16 tensors (flag `bf16`), with torch's
 * rounding: bf16 values are the high half of an fp32, rounded to nearest even; fp16 for
 * the quantization metadata that fits it; and the AVX2 horizontal sums the dot-product
 * kernels end with. */
#ifndef LLMOPT_DTYPE_H
#define LLMOPT_DTYPE_H
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

static inline float bf16_to_f32(uint16_t h) {
    const uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x40); /* NaN */
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return (uint16_t)(bits >> 16);
}

/* IEEE half to float, exactly (normal, subnormal, zero, inf and NaN). */
static inline float f16_to_f32(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000) << 16, e = (h >> 10) & 0x1f, m = h & 0x3ff;
    float v;
    if (e == 0) {
        v = (float)m * 5.9604644775390625e-8f; /* m * 2^-24 */
    } else if (e == 31) {
        v = m ? NAN : INFINITY;
    } else {
        uint32_t bits = ((e + 112) << 23) | (m << 13);
        memcpy(&v, &bits, 4);
    }
    uint32_t b;
    memcpy(&b, &v, 4);
    b |= sign;
    memcpy(&v, &b, 4);
    return v;
}

/* Element i of an fp16 (f16 = 1) or fp32 array. */
static inline float load_meta(const void *p, size_t i, int f16) {
    return f16 ? f16_to_f32(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

/* Element i of p, widened to fp32. */
static inline float load_elem(const void *p, size_t i, int bf16) {
    return bf16 ? bf16_to_f32(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

/* v rounded to the dtype (and widened back): what a torch op in that dtype stores. */
static inline float round_to(float v, int bf16) {
    return bf16 ? bf16_to_f32(f32_to_bf16(v)) : v;
}

/* Store v as element i of p; returns the value stored, widened back. */
static inline float store_elem(void *p, size_t i, float v, int bf16) {
    if (!bf16) {
        ((float *)p)[i] = v;
        return v;
    }
    const uint16_t h = f32_to_bf16(v);
    ((uint16_t *)p)[i] = h;
    return bf16_to_f32(h);
}

#ifdef __AVX2__
#include <immintrin.h>

static inline float hsum8(__m256 v) { /* the sum of the 8 lanes */
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* The lane sums of a[0..7], as lane i of the result (8 horizontal sums at once). */
static inline __m256 sum8(const __m256 *a) {
    const __m256 s01 = _mm256_hadd_ps(a[0], a[1]), s23 = _mm256_hadd_ps(a[2], a[3]);
    const __m256 s45 = _mm256_hadd_ps(a[4], a[5]), s67 = _mm256_hadd_ps(a[6], a[7]);
    const __m256 s0123 = _mm256_hadd_ps(s01, s23), s4567 = _mm256_hadd_ps(s45, s67);
    /* s0123 holds a[0..3]'s sums of their low and high 128-bit halves; likewise s4567. */
    return _mm256_add_ps(_mm256_permute2f128_ps(s0123, s4567, 0x20),
                         _mm256_permute2f128_ps(s0123, s4567, 0x31));
}
#endif
#endif
