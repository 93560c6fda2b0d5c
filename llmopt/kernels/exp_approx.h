/* e^x for x <= 0 (scores minus their maximum), scalar and on 16 AVX-512 lanes, for the
 * attention kernels' softmax. */
#ifndef LLMOPT_EXP_APPROX_H
#define LLMOPT_EXP_APPROX_H
#include <math.h>
#include <stdint.h>
#include <string.h>

/* 2^(x log2 e) split into 2^i (built in the exponent bits) times 2^f, f in [0, 1), by a
 * degree-6 polynomial; relative error about 1e-7 in fp32. In a form the compiler
 * vectorises under omp simd; libm's expf stays scalar here (its vector variants need
 * -ffast-math, which would change FTZ for torch).
 *
 * Horner's rule for the least-squares fit of 2^f on [0, 1]: MUL_ADD(a, b, c) = a b + c,
 * K(c) a constant, so that the scalar and the vector exp share one polynomial. */
#define EXP2_POLY(f, MUL_ADD, K)                                                          \
    MUL_ADD(MUL_ADD(MUL_ADD(MUL_ADD(MUL_ADD(MUL_ADD(K(2.18712545e-4f), f, K(1.23824100e-3f)), \
                                            f, K(9.68618799e-3f)),                        \
                                    f, K(5.54789108e-2f)),                                \
                            f, K(2.40231097e-1f)),                                        \
                    f, K(6.93146838e-1f)),                                                \
            f, K(1.00000001f))
#define SCALAR_MUL_ADD(a, b, c) ((a) * (b) + (c))
#define SCALAR_K(c) (c)

static inline float exp_nonpositive(float x) {
    x = x < -87.0f ? -87.0f : x;
    const float t = x * 1.44269504f;
    const float fi = floorf(t);
    const float f = t - fi;
    const float p = EXP2_POLY(f, SCALAR_MUL_ADD, SCALAR_K);
    const int32_t bits = ((int32_t)fi + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

#ifdef __AVX512F__
#include <immintrin.h>

/* The same on 16 lanes (scalef multiplies by 2^fi exactly, as the exponent bits do). */
static inline __m512 exp512_nonpositive(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    const __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504f));
    const __m512 fi = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_sub_ps(t, fi);
    return _mm512_scalef_ps(EXP2_POLY(f, _mm512_fmadd_ps, _mm512_set1_ps), fi);
}
#endif
#endif
