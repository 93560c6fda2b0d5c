/* SwiGLU's activation for M rows: a = silu(g) * u, from the fused gate/up projection's
 * output gu (M, 2I): g = gu[:, :I], u = gu[:, I:]; a (M, I). fp32 or bf16 (both), rounded
 * as torch rounds in the dtype: silu's result, then the product. silu(g) = g * sigmoid(g),
 * sigmoid from e^-|g| (exp_nonpositive, which vectorises; libm's expf stays scalar). The
 * decode step (decode_layers.c) and the layer-by-layer path (layers/mlp.py) both call
 * this, so a row's activations are the same whichever path its step takes. */
#include <math.h>
#include <stddef.h>

#include "dtype.h"
#include "exp_approx.h"

void silu_mul(const void *gu, void *a, int M, int I, int bf16) {
#pragma omp parallel for schedule(static) if (M > 1)
    for (int m = 0; m < M; m++) {
        float s[I];
        const size_t row = (size_t)m * 2 * I;
#pragma omp simd
        for (int i = 0; i < I; i++) {
            const float g = load_elem(gu, row + i, bf16);
            const float e = exp_nonpositive(-fabsf(g)); /* e^-|g| in (0, 1] */
            const float sig = g >= 0.0f ? 1.0f / (1.0f + e) : e / (1.0f + e);
            s[i] = round_to(g * sig, bf16);
        }
        for (int i = 0; i < I; i++)
            store_elem(a, (size_t)m * I + i, s[i] * load_elem(gu, row + I + i, bf16), bf16);
    }
}
