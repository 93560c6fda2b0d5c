/* y = x W^T (+ b) for a bf16 weight W (N, K) and a few rows of x, on the CPU.
 *
 * On CPUs without native bf16 arithmetic (AVX2) torch's bf16 matmul reads one-row
 * decode weights well below memory speed (oneDNN widens as it goes); this widens eight
 * weights with a zero-extend and a shift and multiplies in fp32, two rows of W at a time
 * so each load of x serves both, at the memory's speed. Sums in fp32; the result is
 * rounded to y's dtype once. Rows of x go GEMV_ROWS at a time (their accumulators fill
 * the registers) over each row of W, which stays in cache meanwhile.
 *
 * x: (M, K) fp32 or bf16 (x_bf16); W: (N, K) bf16; bias: (N,) fp32 or NULL;
 * y: (M, N) fp32 or bf16 (y_bf16). K % 8 == 0.
 */
#include <stdint.h>
#include <stdlib.h>

#include "dtype.h"
#ifdef __AVX2__
#include <immintrin.h>
#endif

#define GEMV_ROWS 8

#ifdef __AVX2__
static inline __m256 widen8(const uint16_t *w) { /* 8 bf16 -> 8 fp32 */
    const __m128i h = _mm_loadu_si128((const __m128i *)w);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
#endif

/* out[m] = x[m] . w for one row w of W; x already fp32 (M, K), M <= GEMV_ROWS. */
static inline __attribute__((always_inline)) void dense_row(const uint16_t *w, const float *x,
                                                            int M, int K, float *out) {
#ifdef __AVX2__
    __m256 acc[GEMV_ROWS][2];
    for (int m = 0; m < M; m++) acc[m][0] = acc[m][1] = _mm256_setzero_ps();
    int k = 0;
    for (; k + 16 <= K; k += 16) { /* two chains per row of x: FMA latency */
        const __m256 w0 = widen8(w + k), w1 = widen8(w + k + 8);
        for (int m = 0; m < M; m++) {
            const float *xm = x + (size_t)m * K + k;
            acc[m][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xm), acc[m][0]);
            acc[m][1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xm + 8), acc[m][1]);
        }
    }
    for (; k < K; k += 8) {
        const __m256 w0 = widen8(w + k);
        for (int m = 0; m < M; m++)
            acc[m][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + (size_t)m * K + k), acc[m][0]);
    }
    for (int m = 0; m < M; m++) out[m] = hsum8(_mm256_add_ps(acc[m][0], acc[m][1]));
#else
    for (int m = 0; m < M; m++) {
        float s = 0.0f;
        for (int k = 0; k < K; k++) s += bf16_to_f32(w[k]) * x[(size_t)m * K + k];
        out[m] = s;
    }
#endif
}

/* Returns 0, or -1 for shapes it does not take. */
int gemv_bf16(const void *x, int x_bf16, int M, int K, const uint16_t *w, int N,
              const float *bias, void *y, int y_bf16) {
    if (M < 1 || K % 8) return -1;
    float *xf = malloc(sizeof(float) * (size_t)M * K);
    if (!xf) return -1;
    for (size_t i = 0; i < (size_t)M * K; i++) xf[i] = load_elem(x, i, x_bf16);
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        for (int m0 = 0; m0 < M; m0 += GEMV_ROWS) {
            const int rows = M - m0 < GEMV_ROWS ? M - m0 : GEMV_ROWS;
            float out[GEMV_ROWS];
            if (M == 1) /* decode's case, with its accumulators in registers */
                dense_row(w + (size_t)n * K, xf, 1, K, out);
            else
                dense_row(w + (size_t)n * K, xf + (size_t)m0 * K, rows, K, out);
            for (int m = 0; m < rows; m++)
                store_elem(y, (size_t)(m0 + m) * N + n, out[m] + (bias ? bias[n] : 0.0f),
                           y_bf16);
        }
    }
    free(xf);
    return 0;
}
