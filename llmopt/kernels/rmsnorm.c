/* RMSNorm of the rows of x, optionally after adding x into a residual stream in place:
 *
 *   residual += x (if residual is given);  r = residual or x
 *   out = weight * round(r / sqrt(mean(r^2) + eps))
 *
 * One call instead of the eight torch ops (cast, square, mean, add, rsqrt, multiply,
 * cast back, weight) plus the residual add: at decode each of those is a few
 * microseconds of dispatch around a 576-element loop, and a 30-layer model runs 122
 * of them per token. The arithmetic follows the torch module exactly: the sum in
 * fp32, the normalised value rounded to the model's dtype before the weight multiplies
 * (as Llama's reference does), the residual sum rounded like torch's add.
 *
 * x, residual, weight, out: fp32 or bf16 (all the same), rows of `dim`, contiguous.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "dtype.h"


void rmsnorm(const void *x, void *residual, const void *weight, void *out, int rows, int dim,
             float eps, int bf16) {
#pragma omp parallel for if (rows > 1) schedule(static)
    for (int r = 0; r < rows; r++) {
        const size_t base = (size_t)r * dim;
        const void *src = residual ? residual : x;
        float ss = 0.0f;
        if (residual) {
            for (int i = 0; i < dim; i++) {
                const float v = store_elem(residual, base + i,
                                      load_elem(residual, base + i, bf16) + load_elem(x, base + i, bf16), bf16);
                ss += v * v;
            }
        } else {
#pragma omp simd reduction(+ : ss)
            for (int i = 0; i < dim; i++) {
                const float v = load_elem(x, base + i, bf16);
                ss += v * v;
            }
        }
        const float inv = 1.0f / sqrtf(ss / (float)dim + eps);
        for (int i = 0; i < dim; i++) {
            const float n = round_to(load_elem(src, base + i, bf16) * inv, bf16);
            store_elem(out, base + i, load_elem(weight, i, bf16) * n, bf16);
        }
    }
}
