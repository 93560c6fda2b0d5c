/* The CPU's int8 multiply-add peak with the instructions qgemv.c uses (256-bit VNNI
 * vpdpbusd where the CPU has it, else vpmaddubsw + vpmaddwd), for benchmarks to quote
 * kernels against: every thread runs `iters` rounds of independent accumulator chains
 * on registers, so that nothing but the arithmetic units sets the pace.
 * Returns the multiply-adds done (all threads), or 0 without AVX2. */
#include <stdint.h>

#ifdef __AVX2__
#include <immintrin.h>
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define DPBUSD(acc, u, s) _mm256_dpbusd_epi32(acc, u, s)
#elif defined(__AVXVNNI__)
#define DPBUSD(acc, u, s) _mm256_dpbusd_avx_epi32(acc, u, s)
#endif
#define CHAINS 10 /* more chains than the instruction's latency times its throughput */
#endif

static volatile int sink;

int64_t int8_peak(int64_t iters, int seed) {
#ifdef __AVX2__
    int64_t total = 0;
#pragma omp parallel reduction(+ : total)
    {
        const __m256i u = _mm256_set1_epi8((char)(seed | 1));
        __m256i acc[CHAINS];
        for (int i = 0; i < CHAINS; i++) acc[i] = _mm256_set1_epi32(i);
        for (int64_t n = 0; n < iters; n++)
            for (int i = 0; i < CHAINS; i++) {
#ifdef DPBUSD
                acc[i] = DPBUSD(acc[i], u, _mm256_set1_epi8(3));
#else
                /* the products read the chain itself, so nothing is hoisted out of the loop */
                const __m256i pairs = _mm256_maddubs_epi16(u, acc[i]);
                acc[i] = _mm256_add_epi32(acc[i], _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
#endif
            }
        __m256i sum = acc[0];
        for (int i = 1; i < CHAINS; i++) sum = _mm256_add_epi32(sum, acc[i]);
        sink = _mm256_extract_epi32(sum, 0); /* used: the loop is not optimised away */
        total += iters * CHAINS * 32;
    }
    return total;
#else
    (void)iters;
    (void)seed;
    return 0;
#endif
}
