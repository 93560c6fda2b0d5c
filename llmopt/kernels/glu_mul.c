/* The gated MLPs' activation for M rows: a = act(g) * u, from the fused gate/up
 * projection's output gu (M, 2I): g = gu[:, :I], u = gu[:, I:]; a (M, I). act is SiLU
 * (SwiGLU: Llama, Qwen) or, with `gelu`, GELU in its tanh form (GeGLU: Gemma). fp32 or
 * bf16 (both), rounded as torch rounds in the dtype: the activation's result, then the
 * product. The decode step (decode_layers.c) and the layer-by-layer path
 * (layers/mlp.py) both call this, so a row's activations are the same whichever path
 * its step takes.
 *
 * Both are g * sigmoid(z): z = g for SiLU; z = 2 y, y = sqrt(2 / pi) (g + 0.044715 g^3)
 * for GELU (g / 2 (1 + tanh(y)) is the same number, without the cancellation of
 * 1 + tanh(y) for y < 0). The sigmoid is (z >= 0 ? 1 : e) / (1 + e), e = e^-|z| in
 * (0, 1] (exp_approx.h: libm's expf stays scalar): no overflow either side. */
#include <math.h>
#include <stddef.h>
#include <stdint.h>

#include "dtype.h"
#include "exp_approx.h"

#define GELU_K 0.7978845608f /* sqrt(2 / pi) */
#define GELU_C 0.044715f

static inline float glu_act(float g, int gelu) {
    const float z = gelu ? 2.0f * (GELU_K * (g + GELU_C * g * g * g)) : g;
    const float e = exp_nonpositive(-fabsf(z));
    return g * ((z >= 0.0f ? 1.0f : e) / (1.0f + e));
}

#ifdef __AVX512F__
/* The same on 16 lanes (GCC leaves the scalar loop unvectorised: floorf and the
 * branches), for the fp32 rows; bf16 rows keep the scalar form, whose rounding to bf16
 * has no vector instruction before AVX512-BF16. */
static inline __m512 glu_act512(__m512 g, int gelu) {
    const __m512 one = _mm512_set1_ps(1.0f);
    __m512 z = g;
    if (gelu) {
        const __m512 g3 = _mm512_mul_ps(_mm512_mul_ps(g, g), g);
        const __m512 y = _mm512_mul_ps(_mm512_set1_ps(GELU_K),
                                       _mm512_fmadd_ps(_mm512_set1_ps(GELU_C), g3, g));
        z = _mm512_mul_ps(_mm512_set1_ps(2.0f), y);
    }
    const __m512 e = exp512_nonpositive(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_abs_ps(z)));
    const __mmask16 pos = _mm512_cmp_ps_mask(z, _mm512_setzero_ps(), _CMP_GE_OQ);
    const __m512 num = _mm512_mask_blend_ps(pos, e, one); /* z >= 0 ? 1 : e */
    return _mm512_mul_ps(g, _mm512_div_ps(num, _mm512_add_ps(one, e)));
}
#endif

void glu_mul(const void *gu, void *a, int M, int I, int bf16, int gelu) {
#pragma omp parallel for schedule(static) if (M > 1)
    for (int m = 0; m < M; m++) {
        const size_t row = (size_t)m * 2 * I;
        if (bf16) {
            const uint16_t *g = (const uint16_t *)gu + row, *u = g + I;
            uint16_t *out = (uint16_t *)a + (size_t)m * I;
            for (int i = 0; i < I; i++) {
                const float s = round_to(glu_act(bf16_to_f32(g[i]), gelu), 1);
                out[i] = f32_to_bf16(s * bf16_to_f32(u[i]));
            }
            continue;
        }
        const float *g = (const float *)gu + row, *u = g + I;
        float *out = (float *)a + (size_t)m * I;
#ifdef __AVX512F__
        for (int i = 0; i < I; i += 16) {
            const __mmask16 k = I - i >= 16 ? 0xffff : (__mmask16)((1u << (I - i)) - 1);
            const __m512 s = glu_act512(_mm512_maskz_loadu_ps(k, g + i), gelu);
            _mm512_mask_storeu_ps(out + i, k, _mm512_mul_ps(s, _mm512_maskz_loadu_ps(k, u + i)));
        }
#else
        for (int i = 0; i < I; i++) out[i] = glu_act(g[i], gelu) * u[i];
#endif
    }
}
