/* GeGLU's activation for M rows: a = gelu(g) * u, from the fused gate/up projection's
 * output gu (M, 2I): g = gu[:, :I], u = gu[:, I:]; a (M, I). GELU in its tanh form (what
 * Gemma uses): gelu(g) = g / 2 * (1 + tanh(y)), y = sqrt(2 / pi) * (g + 0.044715 g^3),
 * computed as g * sigmoid(2 y) (the same number: 1 + tanh(y) = 2 sigmoid(2 y)), the
 * sigmoid from e^-2|y| as silu_mul.c's: no cancellation in 1 + tanh(y) for y < 0. fp32 or bf16 (both), rounded as torch rounds in the dtype:
 * gelu's result, then the product. As silu_mul.c for SwiGLU, the decode step
 * (decode_layers.c) and the layer-by-layer path (layers/mlp.py) both call this, so a
 * row's activations are the same whichever path its step takes. */
#include <math.h>
#include <stddef.h>
#include <stdint.h>

#include "dtype.h"
#include "exp_approx.h"

#define GELU_K 0.7978845608f /* sqrt(2 / pi) */
#define GELU_C 0.044715f

/* sigmoid(2y) = (y >= 0 ? 1 : e) / (1 + e), e = e^-2|y| in (0, 1]: no overflow. */
static inline float gelu(float g) {
    const float y = GELU_K * (g + GELU_C * g * g * g);
    const float e = exp_nonpositive(-2.0f * fabsf(y));
    return g * ((y >= 0.0f ? 1.0f : e) / (1.0f + e));
}

#ifdef __AVX512F__
/* The same on 16 lanes, for the fp32 rows. */
static inline __m512 gelu512(__m512 g) {
    const __m512 one = _mm512_set1_ps(1.0f);
    const __m512 g3 = _mm512_mul_ps(_mm512_mul_ps(g, g), g);
    const __m512 y = _mm512_mul_ps(_mm512_set1_ps(GELU_K),
                                   _mm512_fmadd_ps(_mm512_set1_ps(GELU_C), g3, g));
    const __m512 e = exp512_nonpositive(_mm512_mul_ps(_mm512_set1_ps(-2.0f), _mm512_abs_ps(y)));
    const __mmask16 pos = _mm512_cmp_ps_mask(y, _mm512_setzero_ps(), _CMP_GE_OQ);
    const __m512 num = _mm512_mask_blend_ps(pos, e, one); /* y >= 0 ? 1 : e */
    return _mm512_mul_ps(g, _mm512_div_ps(num, _mm512_add_ps(one, e)));
}
#endif

void gelu_mul(const void *gu, void *a, int M, int I, int bf16) {
#pragma omp parallel for schedule(static) if (M > 1)
    for (int m = 0; m < M; m++) {
        const size_t row = (size_t)m * 2 * I;
        if (bf16) {
            const uint16_t *g = (const uint16_t *)gu + row, *u = g + I;
            uint16_t *out = (uint16_t *)a + (size_t)m * I;
            for (int i = 0; i < I; i++) {
                const float s = round_to(gelu(bf16_to_f32(g[i])), 1);
                out[i] = f32_to_bf16(s * bf16_to_f32(u[i]));
            }
            continue;
        }
        const float *g = (const float *)gu + row, *u = g + I;
        float *out = (float *)a + (size_t)m * I;
#ifdef __AVX512F__
        for (int i = 0; i < I; i += 16) {
            const __mmask16 k = I - i >= 16 ? 0xffff : (__mmask16)((1u << (I - i)) - 1);
            const __m512 s = gelu512(_mm512_maskz_loadu_ps(k, g + i));
            _mm512_mask_storeu_ps(out + i, k, _mm512_mul_ps(s, _mm512_maskz_loadu_ps(k, u + i)));
        }
#else
        for (int i = 0; i < I; i++) out[i] = gelu(g[i]) * u[i];
#endif
    }
}
