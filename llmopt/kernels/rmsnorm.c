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

static inline float load(const void *p, size_t i, int bf16) {
    if (!bf16) return ((const float *)p)[i];
    const uint32_t bits = (uint32_t)((const uint16_t *)p)[i] << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline uint16_t to_bf16(float f) { /* round to nearest even, as torch */
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x40); /* NaN */
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return (uint16_t)(bits >> 16);
}

/* Store v in the dtype and return the value stored, widened back. */
static inline float store(void *p, size_t i, float v, int bf16) {
    if (!bf16) {
        ((float *)p)[i] = v;
        return v;
    }
    const uint16_t h = to_bf16(v);
    ((uint16_t *)p)[i] = h;
    return load(&h, 0, 1);
}

static inline float round_to(float v, int bf16) {
    if (!bf16) return v;
    const uint16_t h = to_bf16(v);
    return load(&h, 0, 1);
}

void rmsnorm(const void *x, void *residual, const void *weight, void *out, int rows, int dim,
             float eps, int bf16) {
#pragma omp parallel for if (rows > 1) schedule(static)
    for (int r = 0; r < rows; r++) {
        const size_t base = (size_t)r * dim;
        const void *src = residual ? residual : x;
        float ss = 0.0f;
        if (residual) {
            for (int i = 0; i < dim; i++) {
                const float v = store(residual, base + i,
                                      load(residual, base + i, bf16) + load(x, base + i, bf16), bf16);
                ss += v * v;
            }
        } else {
#pragma omp simd reduction(+ : ss)
            for (int i = 0; i < dim; i++) {
                const float v = load(x, base + i, bf16);
                ss += v * v;
            }
        }
        const float inv = 1.0f / sqrtf(ss / (float)dim + eps);
        for (int i = 0; i < dim; i++) {
            const float n = round_to(load(src, base + i, bf16) * inv, bf16);
            store(out, base + i, load(weight, i, bf16) * n, bf16);
        }
    }
}
