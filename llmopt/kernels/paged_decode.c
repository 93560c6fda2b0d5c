/* Decode attention over a paged KV cache, reading keys and values in place.
 *
 * One query token per sequence. For sequence b, its visible keys are the cache slots
 * slots[b, 0 .. lens[b]-1] (any order of blocks). A torch version has to gather those
 * slots into a new tensor first, copying every sequence's whole KV each step; this
 * reads each key and value once, where it lies.
 *
 * Shapes (fp32, contiguous): q (B, H, D); k, v (S, KV, D); slots (B, L) int64;
 * lens (B,) int64; out (B, H, D). Query head h reads KV head h / (H / KV).
 *
 * Work item: one (sequence, KV head) pair with its G = H / KV query heads, so each
 * key and value is read once for all heads that share it (grouped-query attention),
 * over a range of its keys. With few pairs (one sequence: SmolLM2 has 3 KV heads for 2
 * threads, and the idle thread spun through a fifth of the decode step) the keys split
 * into ranges, each with its own maximum, sum and weighted values, merged at the end
 * (split-K, as flash-decoding does on GPUs).
 * Per query head, scores (dot products vectorised with omp simd: without it the
 * compiler keeps the float sum in order, one FMA at a time), then exp; then one pass
 * over the values for all G heads. The caller guarantees G * D <= MAX_GD.
 */
#include <omp.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "dtype.h"

/* e^x for x <= 0 (scores minus their maximum), in a form the compiler vectorises:
 * 2^(x log2 e) split into 2^i (built in the exponent bits) times 2^f, f in [0, 1),
 * by a degree-6 polynomial; relative error about 1e-7 in fp32. Libm's expf stays scalar
 * here (its vector variants need -ffast-math, which would change FTZ for torch). */
static inline float exp_nonpositive(float x) {
    x = x < -87.0f ? -87.0f : x;
    const float t = x * 1.44269504f;
    const float fi = floorf(t);
    const float f = t - fi;
    float p = 2.18712545e-4f; /* least-squares fit of 2^f on [0, 1] */
    p = p * f + 1.23824100e-3f;
    p = p * f + 9.68618799e-3f;
    p = p * f + 5.54789108e-2f;
    p = p * f + 2.40231097e-1f;
    p = p * f + 6.93146838e-1f;
    p = p * f + 1.00000001f;
    const int32_t bits = ((int32_t)fi + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

#ifdef __AVX2__
#include <immintrin.h>

/* q . k for 8 keys at once (D % 8 == 0): eight independent FMA chains, then one
 * transpose-and-add. One key at a time, the dot product was a single chain of D / 8
 * dependent FMAs and a horizontal sum per key, latency-bound. */
static inline __m256 dot8(const float *restrict q, const float *const kp[8], int D) {
    __m256 a[8];
    for (int i = 0; i < 8; i++) a[i] = _mm256_setzero_ps();
    for (int d = 0; d < D; d += 8) {
        const __m256 qv = _mm256_loadu_ps(q + d);
        for (int i = 0; i < 8; i++) a[i] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(kp[i] + d), a[i]);
    }
    return sum8(a);
}

/* acc (D8 * 8 floats) = sum_j p[j] * v[slot j] for one head: the accumulator stays in
 * registers across keys (D8 constant). Keys outer and heads inner kept all heads'
 * accumulators in memory, a load and a store per FMA. */
static inline __attribute__((always_inline)) void weighted_values(
    float *restrict acc, const float *restrict p, const float *restrict v,
    const int64_t *restrict sl, int64_t j0, int64_t j1, int KV, int kvh, int D8) {
    __m256 a[16];
    for (int i = 0; i < D8; i++) a[i] = _mm256_setzero_ps();
    for (int64_t j = j0; j < j1; j++) {
        const float *restrict vj = v + (sl[j] * KV + kvh) * D8 * 8;
        const __m256 pj = _mm256_set1_ps(p[j]);
        for (int i = 0; i < D8; i++) a[i] = _mm256_fmadd_ps(pj, _mm256_loadu_ps(vj + 8 * i), a[i]);
    }
    for (int i = 0; i < D8; i++) _mm256_storeu_ps(acc + 8 * i, a[i]);
}
#endif

#define MAX_GD 4096 /* G * D held in registers/stack per work item: 16 heads x 256 */

void paged_decode(const float *restrict q, const float *restrict k, const float *restrict v,
                  const int64_t *restrict slots, const int64_t *restrict lens, int B, int L,
                  int H, int KV, int D, float scale, float *restrict out) {
    const int G = H / KV, threads = omp_get_max_threads();
    /* Short contexts: the merge costs more than the imbalance (64 keys: 22 us against
     * 18 unsplit; 1024 keys: 182 against 225, one sequence of SmolLM2). */
    const int splits = B * KV >= 2 * threads || L < 256
                           ? 1
                           : (2 * threads + B * KV - 1) / (B * KV);
    /* Per (b, kvh, split, g): the range's max score, sum of exps, weighted values (D). */
    const size_t rec = (size_t)D + 2;
    float *part = malloc(sizeof(float) * (size_t)B * KV * splits * G * rec);
#pragma omp parallel
    {
        float *restrict scores = malloc(sizeof(float) * (size_t)G * (size_t)L); /* (G, L) */
        float qs[MAX_GD]; /* (G, D): the scaled queries of a work item */
#pragma omp for collapse(3) schedule(dynamic, 1)
        for (int b = 0; b < B; b++) {
            for (int kvh = 0; kvh < KV; kvh++) {
                for (int sp = 0; sp < splits; sp++) {
                    const int64_t n = lens[b], j0 = n * sp / splits, j1 = n * (sp + 1) / splits;
                    const int64_t *restrict sl = slots + (int64_t)b * L;
                    const int64_t head0 = (int64_t)b * H + (int64_t)kvh * G;
                    float *rp = part + (((size_t)b * KV + kvh) * splits + sp) * G * rec;
                    for (int i = 0; i < G * D; i++) qs[i] = q[head0 * D + i] * scale;
                    for (int g = 0; g < G; g++) {
                        const float *restrict qh = qs + g * D;
                        float *restrict sg = scores + (int64_t)g * L;
                        float mx = -INFINITY;
                        int64_t j = j0;
#ifdef __AVX2__
                        if (D % 8 == 0) {
                            __m256 vmx = _mm256_set1_ps(-INFINITY);
                            for (; j + 8 <= j1; j += 8) {
                                const float *kp[8];
                                for (int i = 0; i < 8; i++) kp[i] = k + (sl[j + i] * KV + kvh) * D;
                                const __m256 s8 = dot8(qh, kp, D);
                                _mm256_storeu_ps(sg + j, s8);
                                vmx = _mm256_max_ps(vmx, s8);
                            }
                            float m8[8];
                            _mm256_storeu_ps(m8, vmx);
                            for (int i = 0; i < 8; i++) mx = m8[i] > mx ? m8[i] : mx;
                        }
#endif
                        for (; j < j1; j++) {
                            const float *restrict kj = k + (sl[j] * KV + kvh) * D;
                            float s = 0.0f;
#pragma omp simd reduction(+ : s)
                            for (int d = 0; d < D; d++) s += qh[d] * kj[d];
                            sg[j] = s;
                            mx = s > mx ? s : mx;
                        }
                        float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
                        for (int64_t j = j0; j < j1; j++) {
                            sg[j] = exp_nonpositive(sg[j] - mx);
                            sum += sg[j];
                        }
                        rp[g * rec] = mx;
                        rp[g * rec + 1] = sum;
                    }
#ifdef __AVX2__
                    if (D == 64 || D == 128) {
                        for (int g = 0; g < G; g++) {
                            const float *pg = scores + (int64_t)g * L;
                            float *acc = rp + g * rec + 2;
                            if (D == 64)
                                weighted_values(acc, pg, v, sl, j0, j1, KV, kvh, 8);
                            else
                                weighted_values(acc, pg, v, sl, j0, j1, KV, kvh, 16);
                        }
                    } else
#endif
                    {
                        for (int g = 0; g < G; g++)
                            for (int d = 0; d < D; d++) rp[g * rec + 2 + d] = 0.0f;
                        for (int64_t j = j0; j < j1; j++) {
                            const float *restrict vj = v + (sl[j] * KV + kvh) * D;
                            for (int g = 0; g < G; g++) {
                                const float p = scores[(int64_t)g * L + j];
                                float *restrict a = rp + g * rec + 2;
#pragma omp simd
                                for (int d = 0; d < D; d++) a[d] += p * vj[d];
                            }
                        }
                    }
                }
            }
        }
        free(scores);
        /* Merge the ranges: out = sum_s acc_s e^(mx_s - M) / sum_s sum_s e^(mx_s - M). */
#pragma omp for collapse(2)
        for (int b = 0; b < B; b++) {
            for (int h = 0; h < H; h++) {
                const int kvh = h / G, g = h % G;
                const float *rb = part + ((size_t)b * KV + kvh) * splits * G * rec + g * rec;
                float m = -INFINITY, total = 0.0f;
                for (int sp = 0; sp < splits; sp++) {
                    const float ms = rb[sp * G * rec];
                    m = ms > m ? ms : m;
                }
                float *o = out + ((int64_t)b * H + h) * D;
                for (int d = 0; d < D; d++) o[d] = 0.0f;
                for (int sp = 0; sp < splits; sp++) {
                    const float *r = rb + sp * G * rec;
                    if (r[1] == 0.0f) continue; /* an empty range */
                    const float w = exp_nonpositive(r[0] - m);
                    total += r[1] * w;
#pragma omp simd
                    for (int d = 0; d < D; d++) o[d] += r[2 + d] * w;
                }
                const float inv = total > 0.0f ? 1.0f / total : 0.0f;
                for (int d = 0; d < D; d++) o[d] *= inv;
            }
        }
    }
    free(part);
}
