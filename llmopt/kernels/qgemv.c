/* Weight-only int4 / int8 matrix times a few rows, for decode on the CPU.
 *
 * y = x W^T + b for M rows of x (M, K) and a quantized W (N, K) with one
 * scale and offset per group of `group` inputs: W[n, k] = scale[n, g] * q[n, k] +
 * offset[n, g], g = k / group.
 *
 * Why integers: decode reads each weight once per step, so the kernel must run at
 * memory speed, and widening nibbles to floats costs more instructions than the
 * memory system leaves time for on AVX2. The activations are therefore quantized too,
 * to int8 with one scale per 64 inputs (xd = max |x| / 127), and each 32-input half
 * is one integer dot product (vpmaddubsw + vpmaddwd: 32 multiply-adds in two
 * instructions), scaled by scale * xd in fp32. (llama.cpp takes a scale per 32: half
 * the rounding error, but for int4 g64 it costs the int16 sum of a chunk's halves;
 * measured both ways in BENCHMARKS.md, "What decode's arithmetic costs".) The offset
 * term takes the sum of the *rounded* inputs over each group, xsum = xd * sum(xq):
 *
 *   y[m, n] = sum_b scale[n, g(b)] * xd[m, b] * dot(q[n, b], xq[m, b])
 *           + sum_g offset[n, g] * xsum[m, g] + bias[n]
 *
 * so that y is exactly the weights times the rounded x, and the rounding error of an
 * input is multiplied by its weight (centred on zero) rather than by its code q
 * (0..15, all of one sign): with the exact float sum instead, an asymmetric int4 grid
 * makes about twice the error. llama.cpp's Q8_1 activation blocks keep the same sum.
 * The rounding of x (half a step of max|x|/127 per input) is the error this adds.
 *
 * The same kernel serves one row (decode) and hundreds (a batch, a prefill chunk): the
 * weights of a block of 8 rows of W are unpacked once per chunk for several rows of x
 * (4 in block8; 8 in block8_z, for int4 with AVX-512 VNNI), and a row of x goes
 * through the same operations whatever the rows beside it, so that a request's result
 * does not depend on what shares its step. Where the CPU has AMX-INT8, calls of
 * AMX_MIN_ROWS rows or more go to qgemm_amx.c instead: the same quantized x and the
 * same integer products on AMX tiles, summed in another order.
 *
 * Layouts (row-major, one row of W after the other):
 *   bits 4: (N, K / 2) bytes; per 64 inputs, 32 bytes: byte j holds input j (low
 *           nibble) and input j + 32 (high), q in 0..15. K % 64 == 0.
 *   bits 8: (N, K) int8 holding q - 128 (offset adjusted by the caller). K % 32 == 0.
 * scale, offset: per row and group of `group` inputs (32 or a multiple of 64), blocked by
 *   8 rows: (ceil(N / 8), K / group, 8), zero-padded, element [n / 8, g, n % 8] (one
 *   vector load gives a group's values for the 8 rows a block computes). Three forms
 *   (`meta`):
 *   META_F32  fp32 scales and offsets.
 *   META_F16  both in fp16 (where they are exactly fp16, as a GGUF file's block scales
 *             and minimums are).
 *   META_ZERO fp16 scales and, in place of offsets, integer zero points in uint8:
 *             offset = scale * (base - zero), base 0 for int4 and 128 for int8 (whose
 *             codes are stored as q - 128), computed in fp32, where it is exact (an
 *             11-bit scale times a 9-bit integer). Every GPTQ, AWQ and RTN grid has
 *             this form, and its offsets need fp32 as numbers: int4 group 32 then reads
 *             19 bytes per 32 weights instead of 24 (Q4_1: 20).
 * x: (M, K) fp32 or bf16;
 * y: (M, N) fp32 or bf16; bias: (N,) fp32 or NULL.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "dtype.h"
#ifdef __AVX2__
#include <immintrin.h>
#endif

#define QB 64 /* inputs per activation scale, and per chunk of the loops */

enum { META_F32 = 0, META_F16 = 1, META_ZERO = 2 }; /* the forms of scale and offset above */

/* META_ZERO's base: the stored code of weight 0 when zero is 0 (int8 codes are q - 128). */
static inline float code_base(int bits) { return bits == 8 ? 128.0f : 0.0f; }

/* Element i of META_ZERO's offsets (an index into the blocked layout): scale * (base -
 * zero). */
static inline float zero_offset(const void *scale, const void *zero, size_t i, int bits) {
    return load_meta(scale, i, 1) * (code_base(bits) - (float)((const uint8_t *)zero)[i]);
}

/* u8 x s8 dot products of 4 into int32 lanes, where the CPU has VNNI (AVX512-VNNI with
 * VL, or AVX-VNNI): acc + sum of 4 products per lane. */
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define DPBUSD(acc, u, s) _mm256_dpbusd_epi32(acc, u, s)
#elif defined(__AVXVNNI__)
#define DPBUSD(acc, u, s) _mm256_dpbusd_avx_epi32(acc, u, s)
#endif

/* One row of x to int8: xq (K,), a scale per 64 inputs xd (K / 64,), and the sums of
 * the rounded inputs per weight group xsum (K / group,). */
static void quantize_row(const void *x, int x_bf16, int K, int group, int8_t *xq, float *xd,
                         float *xsum) {
    float buf[QB];
    for (int g = 0; g < K / group; g++) xsum[g] = 0.0f;
    for (int c = 0; c < K / QB; c++) {
        float amax = 0.0f;
        for (int j = 0; j < QB; j++) {
            const int k = c * QB + j;
            buf[j] = x_bf16 ? bf16_to_f32(((const uint16_t *)x)[k]) : ((const float *)x)[k];
        }
#pragma omp simd reduction(max : amax)
        for (int j = 0; j < QB; j++) amax = amax > fabsf(buf[j]) ? amax : fabsf(buf[j]);
        const float d = amax / 127.0f;
        const float inv = d > 0.0f ? 1.0f / d : 0.0f;
        xd[c] = d;
        int8_t *q = xq + c * QB;
        int s0 = 0, s1 = 0; /* sums of the two rounded halves */
#pragma omp simd reduction(+ : s0)
        for (int j = 0; j < 32; j++) {
            q[j] = (int8_t)nearbyintf(buf[j] * inv);
            s0 += q[j];
        }
#pragma omp simd reduction(+ : s1)
        for (int j = 32; j < QB; j++) {
            q[j] = (int8_t)nearbyintf(buf[j] * inv);
            s1 += q[j];
        }
        if (group == 32) {
            xsum[2 * c] = d * (float)s0;
            xsum[2 * c + 1] = d * (float)s1;
        } else {
            xsum[c * QB / group] += d * (float)(s0 + s1);
        }
    }
}

/* Rows of W a block computes together, and the stride of its per-row metadata (the
 * metadata layouts hold a group's values for 8 rows side by side). */
#define FS 8

#ifdef __AVX2__
/* One 64-input chunk c of a row of W against `nrows` (1 or 2) rows of x, added into
 * acc[r][slot] (or acc[r][0] / acc[r][1] for the two halves of group 32, which have
 * factors of their own): acc += dot(q[c], xq[c]) * f[c], f[c] = xd[c] * scale[g(c)],
 * the factors FS apart (block8 keeps them for its 8 rows side by side).
 * The weights are loaded and unpacked once for both rows. Products are int16 pair sums
 * (vpmaddubsw: 32 multiply-adds in one instruction; it wants one unsigned operand, so
 * int8 weights give |w| and each row of x takes w's sign; a pair is at most
 * 2 * 128 * 127, inside int16), then int32 (vpmaddwd with ones), then fp32. */
static inline __attribute__((always_inline)) void chunk(__m256 acc[2][2], int slot, int nrows,
                                                        const uint8_t *w, int bits, int halves,
                                                        const float *fa, const float *fb,
                                                        const int8_t *xa, const int8_t *xb,
                                                        int c) {
    const uint8_t *wc = w + (size_t)c * QB * bits / 8;
    __m256i w0, w1, s0 = _mm256_setzero_si256(), s1 = _mm256_setzero_si256();
    if (bits == 4) { /* byte j: input j in the low nibble, j + 32 in the high one */
        const __m256i low = _mm256_set1_epi8(0x0f);
        const __m256i v = _mm256_loadu_si256((const __m256i *)wc);
        w0 = _mm256_and_si256(v, low);
        w1 = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
    } else {
        s0 = _mm256_loadu_si256((const __m256i *)wc);
        s1 = _mm256_loadu_si256((const __m256i *)(wc + 32));
        w0 = _mm256_abs_epi8(s0);
        w1 = _mm256_abs_epi8(s1);
    }
    for (int r = 0; r < nrows; r++) {
        const int8_t *xc = (r ? xb : xa) + c * QB;
        const float *f = r ? fb : fa;
        __m256i x0 = _mm256_loadu_si256((const __m256i *)xc);
        __m256i x1 = _mm256_loadu_si256((const __m256i *)(xc + 32));
        if (bits == 8) {
            x0 = _mm256_sign_epi8(x0, s0);
            x1 = _mm256_sign_epi8(x1, s1);
        }
#ifdef DPBUSD
        /* VNNI: each half's 32 multiply-adds straight into int32 lanes, one instruction
         * (the same integers as the two-step AVX2 sum below: no pair saturates there) */
        const __m256i zero = _mm256_setzero_si256();
        if (halves) {
            const __m256 p0 = _mm256_cvtepi32_ps(DPBUSD(zero, w0, x0));
            const __m256 p1 = _mm256_cvtepi32_ps(DPBUSD(zero, w1, x1));
            acc[r][0] = _mm256_fmadd_ps(p0, _mm256_broadcast_ss(f + FS * 2 * c), acc[r][0]);
            acc[r][1] = _mm256_fmadd_ps(p1, _mm256_broadcast_ss(f + FS * (2 * c + 1)), acc[r][1]);
        } else {
            const __m256i p = DPBUSD(DPBUSD(zero, w0, x0), w1, x1);
            acc[r][slot] =
                _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_broadcast_ss(f + FS * c), acc[r][slot]);
        }
#else
        const __m256i ones = _mm256_set1_epi16(1);
        const __m256i h0 = _mm256_maddubs_epi16(w0, x0), h1 = _mm256_maddubs_epi16(w1, x1);
        if (halves) {
            const __m256 p0 = _mm256_cvtepi32_ps(_mm256_madd_epi16(h0, ones));
            const __m256 p1 = _mm256_cvtepi32_ps(_mm256_madd_epi16(h1, ones));
            /* each half on its own chain: one FMA per chain per chunk (FMA latency,
             * not arithmetic, set the pace with two on one chain) */
            acc[r][0] = _mm256_fmadd_ps(p0, _mm256_broadcast_ss(f + FS * 2 * c), acc[r][0]);
            acc[r][1] = _mm256_fmadd_ps(p1, _mm256_broadcast_ss(f + FS * (2 * c + 1)), acc[r][1]);
        } else { /* int4: the halves add in int16 (|sum| <= 7620); int8's would overflow */
            const __m256i p = bits == 4 ? _mm256_madd_epi16(_mm256_add_epi16(h0, h1), ones)
                                        : _mm256_add_epi32(_mm256_madd_epi16(h0, ones),
                                                           _mm256_madd_epi16(h1, ones));
            acc[r][slot] =
                _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_broadcast_ss(f + FS * c), acc[r][slot]);
        }
#endif
    }
}

/* The chunks of one row of W against `nrows` (1 or 2, a constant once inlined) rows of
 * x, into four chains: acc[row][even/odd chunk], or acc[row][half] for group 32. One
 * row alone sums in the order two rows do, so a row's result does not depend on the
 * rows beside it. */
static inline __attribute__((always_inline)) void row_chunks(__m256 acc[2][2], int nrows,
                                                             const uint8_t *w, int bits,
                                                             int halves, const float *fa,
                                                             const float *fb, const int8_t *xa,
                                                             const int8_t *xb, int nc) {
    int c = 0;
    for (; c + 1 < nc; c += 2) {
        chunk(acc, 0, nrows, w, bits, halves, fa, fb, xa, xb, c);
        chunk(acc, 1, nrows, w, bits, halves, fa, fb, xa, xb, c + 1);
    }
    if (c < nc) chunk(acc, 0, nrows, w, bits, halves, fa, fb, xa, xb, c);
}

/* 8 consecutive metadata values from element i, fp16 (f16 = 1) or fp32. */
static inline __m256 load_meta8(const void *p, size_t i, int f16) {
    if (f16) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)p + i)));
    return _mm256_loadu_ps((const float *)p + i);
}

/* 8 consecutive offsets from element i in fp32, in any form: widened, or made from the
 * zero points as zero_offset does (exact in fp32, so the same values). */
static inline __m256 offset8(const void *scale, const void *offset, size_t i, int meta, int bits) {
    if (meta != META_ZERO) return load_meta8(offset, i, meta == META_F16);
    const __m128i z = _mm_loadl_epi64((const __m128i *)((const uint8_t *)offset + i));
    const __m256 zf = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(z));
    return _mm256_mul_ps(load_meta8(scale, i, 1), _mm256_sub_ps(_mm256_set1_ps(code_base(bits)), zf));
}

/* One row of x's outputs for a block of 8 rows of W (`rows` of them real), from the
 * block's per-row dot accumulators: y[at .. at + rows - 1] = sum8(dots) * row_scale + b
 * + sum_g of[:, g] * xs[g], in fp32 or bf16. */
static inline void store8(const __m256 dots[8], __m256 row_scale, __m256 b, const float *of,
                          const float *xs, int ng, int rows, size_t at, void *y, int y_bf16) {
    __m256 v = _mm256_fmadd_ps(sum8(dots), row_scale, b);
    for (int g = 0; g < ng; g++)
        v = _mm256_fmadd_ps(_mm256_loadu_ps(of + FS * g), _mm256_broadcast_ss(xs + g), v);
    float out[8];
    _mm256_storeu_ps(out, v);
    for (int i = 0; i < rows; i++) {
        if (y_bf16)
            ((uint16_t *)y)[at + i] = f32_to_bf16(out[i]);
        else
            ((float *)y)[at + i] = out[i];
    }
}

/* y[m, n0 .. n0 + 7] for a block of 8 rows of W (`rows` of them real) and every row m of
 * x, two rows of x at a time (`chunk`: each chunk of W unpacked once for both; four
 * accumulator chains, so that FMA latency does not set the pace: int4 group 32 at 16
 * rows, 669 -> 520 us for 3072 x 576 on 2 threads). scale and offset are the block's
 * (K / group, 8) slices of the blocked layouts, so the rest is vector operations over
 * the block's 8 rows: the factors, the offsets (from zero points: once per block), the
 * row scales, the bias and the epilogue
 *   y = sum8(row dots) [* row scales] + bias + sum_g offset[:, g] * xsum[m, g]
 * (sum8, one transpose-add for the 8 rows: a horizontal sum per row cost as much as a
 * row's dot products at K = 576). */
static inline __attribute__((always_inline)) void block8(
    const uint8_t *w, size_t w_row, int bits, int halves, const void *scale, int ng,
    const void *offset, int meta, const int8_t *xq, const float *xd, const float *xsum, int M,
    int K, const int *gi, const float *bias, int rows, int n0, int N, void *y, int y_bf16) {
    const int nc = K / QB, m16 = meta != META_F32;
    const int per_row = !halves && gi[nc - 1] == 0; /* one scale for the whole row */
    const int nf = halves ? 2 * nc : nc;             /* factors: per chunk, or per half */
    float tail[8];
    for (int i = 0; i < 8; i++) tail[i] = i < rows && bias ? bias[n0 + i] : 0.0f;
    const __m256 b = _mm256_loadu_ps(tail);
    const __m256 row_scale = per_row ? load_meta8(scale, 0, m16) : _mm256_set1_ps(1.0f);
    /* The block's offsets in fp32, (ng, 8): fp32 ones as stored, others widened or made
     * from the zero points once for every row of x. */
    float made[meta == META_F32 ? 1 : FS * ng];
    const float *of = meta == META_F32 ? (const float *)offset : made;
    if (meta != META_F32)
        for (int g = 0; g < ng; g++)
            _mm256_storeu_ps(made + FS * g, offset8(scale, offset, FS * g, meta, bits));
    /* The factors of two rows of x against the block's rows, (nf, 8): fa[8 j + i] =
     * xd[m, chunk of j] * scale[n0 + i, group of j] (xd alone with a row scale). */
    float fa[FS * nf], fb[FS * nf];
    for (int m = 0; m < M; m += 2) {
        const int two = m + 1 < M;
        const int8_t *xa = xq + (size_t)m * K, *xb = two ? xa + K : xa;
        const float *da = xd + (size_t)m * nc, *db = two ? da + nc : da;
        for (int j = 0; j < nf; j++) {
            const int c = halves ? j / 2 : j;
            const __m256 s =
                per_row ? _mm256_set1_ps(1.0f) : load_meta8(scale, FS * (halves ? j : gi[j]), m16);
            _mm256_storeu_ps(fa + FS * j, _mm256_mul_ps(_mm256_broadcast_ss(da + c), s));
            if (two) _mm256_storeu_ps(fb + FS * j, _mm256_mul_ps(_mm256_broadcast_ss(db + c), s));
        }
        __m256 acc_a[8], acc_b[8];
        for (int i = 0; i < 8; i++) {
            acc_a[i] = acc_b[i] = _mm256_setzero_ps();
            if (i >= rows) continue;
            const uint8_t *wi = w + (size_t)i * w_row;
            __m256 acc[2][2] = {{_mm256_setzero_ps(), _mm256_setzero_ps()},
                                {_mm256_setzero_ps(), _mm256_setzero_ps()}};
            if (two) /* the last row of an odd M goes alone */
                row_chunks(acc, 2, wi, bits, halves, fa + i, fb + i, xa, xb, nc);
            else
                row_chunks(acc, 1, wi, bits, halves, fa + i, fb + i, xa, xb, nc);
            acc_a[i] = _mm256_add_ps(acc[0][0], acc[0][1]);
            acc_b[i] = _mm256_add_ps(acc[1][0], acc[1][1]);
        }
        for (int r = 0; r <= two; r++)
            store8(r ? acc_b : acc_a, row_scale, b, of, xsum + (size_t)(m + r) * ng, ng, rows,
                   (size_t)(m + r) * N + n0, y, y_bf16);
    }
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__) && \
    !defined(LLMOPT_QGEMV_AVX2) /* a build for testing the AVX2 blocks (qgemv.load) */
/* int4 on AVX-512 VNNI, for calls of ZMIN_ROWS rows and more: a whole 64-input chunk
 * per instruction, ZMR rows of x per unpacked chunk. A chunk's 32 bytes become 64 codes
 * in input order (low nibbles then high ones, as the layout holds them); one vpdpbusd
 * against a row of x's 64 int8 gives 16 int32 lanes, 0-7 from inputs 0-31 and 8-15
 * from 32-63. The arithmetic is block8's, bit for bit, so that a row's result does not
 * depend on which of the two a call takes: for group 32 the lanes are block8's two
 * half chains side by side (each converted and scaled by its own factor xd * scale);
 * for larger groups the two halves' integer sums are added first, then converted and
 * scaled into block8's two chains of even and odd chunks. */
#define ZMR 8
#define ZMIN_ROWS 4 /* fewer rows: block8, faster there and bit for bit the same */

static inline __m512i q4_chunk(const uint8_t *w, int c) {
    const uint8_t *wc = w + (size_t)c * 32;
    const __m256i low = _mm256_set1_epi8(0x0f);
    const __m256i v = _mm256_loadu_si256((const __m256i *)wc);
    const __m256i lo = _mm256_and_si256(v, low);
    const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
    return _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
}

/* x's rows for z_rows, packed by blocks of ZMR rows: block b holds, per chunk c, the
 * ZMR rows' 64 int8 one after the other ((nc, ZMR, 64) bytes), and their activation
 * scales ((nc, ZMR) floats), so that one pointer and constant offsets reach them all. */
static void pack_x(const int8_t *xq, const float *xd, int M, int K, int8_t *xp, float *dp) {
    const int nc = K / QB;
    for (int m = 0; m < M; m++)
        for (int c = 0; c < nc; c++) {
            const size_t at = ((size_t)(m / ZMR) * nc + c) * ZMR + m % ZMR;
            memcpy(xp + at * QB, xq + (size_t)m * K + (size_t)c * QB, QB);
            dp[at] = xd[(size_t)m * nc + c];
        }
}

/* One row of W (its chunks at w, its fp32 scales at sf, FS apart per group) against
 * `nrows` rows of a packed block of x (a constant once inlined): for group 32 into
 * acc[r] (16 lanes: both halves), else into chains[r][c % 2] (8 lanes). */
static inline __attribute__((always_inline)) void z_rows(__m512 acc[ZMR],
                                                         __m256 chains[ZMR][2], int nrows,
                                                         const uint8_t *w, int halves,
                                                         int per_row, const float *sf,
                                                         const int *gi, const int8_t *xb,
                                                         const float *db, int nc) {
    for (int c = 0; c < nc; c++) {
        const __m512i wq = q4_chunk(w, c);
        const int8_t *xc = xb + (size_t)c * ZMR * QB;
        const float *dc = db + (size_t)c * ZMR;
        if (halves) {
            const __m512 sv = _mm512_insertf32x8(_mm512_set1_ps(sf[FS * 2 * c]),
                                                 _mm256_set1_ps(sf[FS * (2 * c + 1)]), 1);
            for (int r = 0; r < nrows; r++) {
                const __m512i xv = _mm512_loadu_si512((const void *)(xc + r * QB));
                const __m512i p = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wq, xv);
                const __m512 f = _mm512_mul_ps(_mm512_set1_ps(dc[r]), sv);
                acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), f, acc[r]);
            }
        } else {
            const float s = per_row ? 1.0f : sf[FS * gi[c]];
            for (int r = 0; r < nrows; r++) {
                const __m512i xv = _mm512_loadu_si512((const void *)(xc + r * QB));
                const __m512i p = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wq, xv);
                const __m256i p8 = _mm256_add_epi32(_mm512_castsi512_si256(p),
                                                    _mm512_extracti64x4_epi64(p, 1));
                const __m256 f = _mm256_set1_ps(dc[r] * s);
                chains[r][c & 1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p8), f, chains[r][c & 1]);
            }
        }
    }
}

/* block8 for int4 on AVX-512 VNNI (z_rows), the same layouts and epilogue; x packed by
 * pack_x. (int8 stays on the AVX2 blocks: with 64 bytes a chunk, a single row runs
 * slower here.) */
static inline __attribute__((always_inline)) void block8_z(
    const uint8_t *w, size_t w_row, int halves, const void *scale, int ng, const void *offset,
    int meta, const int8_t *xp, const float *dp, const float *xsum, int M, int K,
    const int *gi, const float *bias, int rows, int n0, int N, void *y, int y_bf16) {
    const int nc = K / QB, m16 = meta != META_F32;
    const int per_row = !halves && gi[nc - 1] == 0;
    float tail[8];
    for (int i = 0; i < 8; i++) tail[i] = i < rows && bias ? bias[n0 + i] : 0.0f;
    const __m256 b = _mm256_loadu_ps(tail);
    const __m256 row_scale = per_row ? load_meta8(scale, 0, m16) : _mm256_set1_ps(1.0f);
    /* The block's scales and offsets in fp32, (ng, 8), once for every row of x. */
    float sf[FS * ng], of[FS * ng];
    for (int g = 0; g < ng; g++) {
        _mm256_storeu_ps(sf + FS * g, load_meta8(scale, FS * g, m16));
        _mm256_storeu_ps(of + FS * g, offset8(scale, offset, FS * g, meta, 4));
    }
    for (int m = 0; m < M; m += ZMR) {
        const int nr = M - m < ZMR ? M - m : ZMR;
        const int8_t *xb = xp + (size_t)m * K; /* block m / ZMR: (nc, ZMR, 64) */
        const float *db = dp + (size_t)m * nc;
        __m256 sums[ZMR][8];
        for (int i = 0; i < 8; i++) {
            __m512 acc[ZMR];
            __m256 chains[ZMR][2];
            for (int r = 0; r < ZMR; r++) {
                acc[r] = _mm512_setzero_ps();
                chains[r][0] = chains[r][1] = _mm256_setzero_ps();
            }
            if (i < rows) {
                const uint8_t *wi = w + (size_t)i * w_row;
                switch (nr) { /* constant row counts: each its own unrolled loop */
#define Z_ROWS(R) z_rows(acc, chains, R, wi, halves, per_row, sf + i, gi, xb, db, nc)
                case 8: Z_ROWS(8); break;
                case 7: Z_ROWS(7); break;
                case 6: Z_ROWS(6); break;
                case 5: Z_ROWS(5); break;
                case 4: Z_ROWS(4); break;
                case 3: Z_ROWS(3); break;
                case 2: Z_ROWS(2); break;
                default: Z_ROWS(1); break;
#undef Z_ROWS
                }
            }
            for (int r = 0; r < nr; r++) /* block8's acc[0] + acc[1] */
                sums[r][i] = halves ? _mm256_add_ps(_mm512_castps512_ps256(acc[r]),
                                                    _mm512_extractf32x8_ps(acc[r], 1))
                                    : _mm256_add_ps(chains[r][0], chains[r][1]);
        }
        for (int r = 0; r < nr; r++)
            store8(sums[r], row_scale, b, of, xsum + (size_t)(m + r) * ng, ng, rows,
                   (size_t)(m + r) * N + n0, y, y_bf16);
    }
}
#define HAVE_BLOCK8_Z 1
#endif
#else
static inline void block8(const uint8_t *w, size_t w_row, int bits, int halves,
                          const void *scale, int ng, const void *offset, int meta,
                          const int8_t *xq, const float *xd, const float *xsum, int M, int K,
                          const int *gi, const float *bias, int rows, int n0, int N, void *y,
                          int y_bf16) {
    const int nc = K / QB, m16 = meta != META_F32;
    for (int m = 0; m < M; m++) {
        for (int i = 0; i < rows; i++) {
            const uint8_t *wn = w + (size_t)i * w_row;
            float acc = 0.0f;
            for (int c = 0; c < nc; c++) {
                for (int half = 0; half < 2; half++) {
                    int32_t dot = 0;
                    for (int j = 0; j < 32; j++) {
                        const int k = c * QB + half * 32 + j;
                        const int q = bits == 4 ? (wn[c * 32 + j] >> (4 * half)) & 15
                                                : ((const int8_t *)wn)[k];
                        dot += q * xq[(size_t)m * K + k];
                    }
                    const int g = halves ? 2 * c + half : gi[c];
                    acc += load_meta(scale, FS * g + i, m16) * xd[m * nc + c] * (float)dot;
                }
            }
            for (int g = 0; g < ng; g++)
                acc += (meta == META_ZERO ? zero_offset(scale, offset, FS * g + i, bits)
                                          : load_meta(offset, FS * g + i, m16)) *
                       xsum[(size_t)m * ng + g];
            acc += bias ? bias[n0 + i] : 0.0f;
            const size_t at = (size_t)m * N + n0 + i;
            if (y_bf16)
                ((uint16_t *)y)[at] = f32_to_bf16(acc);
            else
                ((float *)y)[at] = acc;
        }
    }
}
#endif

#include "qgemm_amx.c"

/* Rows of x from which AMX tiles (where the CPU has them) beat the row kernel below. */
#define AMX_MIN_ROWS 4

/* 1 when calls of AMX_MIN_ROWS rows or more run on AMX tiles. */
int qgemv_amx(void) { return amx_ready(); }

/* Returns 0, or -1 when the shapes are outside what this kernel takes. */
int qgemv(const void *x, int x_bf16, int M, int K, const void *w, int bits, const void *scale,
          const void *offset, int group, int meta, int N, const float *bias, void *y,
          int y_bf16) {
    if (M < 1 || K % QB || K % group || !(group == 32 || group % QB == 0) ||
        (bits != 4 && bits != 8) || meta < META_F32 || meta > META_ZERO)
        return -1;
    const int nc = K / QB, ng = K / group, halves = group == 32;
    int8_t *xq = malloc((size_t)M * K);
    float *xd = malloc(sizeof(float) * (size_t)M * (nc + ng));
    if (!xq || !xd) {
        free(xq);
        free(xd);
        return -1;
    }
    float *xsum = xd + (size_t)M * nc;
    /* Group of each chunk, looked up instead of divided in the inner loop (a division
     * by the runtime group size there costs half the kernel's time). */
    int gi[nc];
    for (int c = 0; c < nc; c++) gi[c] = c * QB / group;
    const size_t x_row = (size_t)K * (x_bf16 ? 2 : 4);
    for (int m = 0; m < M; m++)
        quantize_row((const char *)x + m * x_row, x_bf16, K, group, xq + (size_t)m * K,
                     xd + (size_t)m * nc, xsum + (size_t)m * ng);
    const size_t w_row = (size_t)K * bits / 8;
    if (M >= AMX_MIN_ROWS && amx_ready()) {
        const int rc = qgemm_amx(xq, xd, xsum, M, K, w, bits, scale, offset, group, meta, N,
                                 bias, y, y_bf16);
        free(xq);
        free(xd);
        return rc;
    }
    int8_t *xp = NULL;
    float *dp = NULL;
#ifdef HAVE_BLOCK8_Z
    if (bits == 4 && M >= ZMIN_ROWS) { /* x packed for z_rows: whole blocks of ZMR rows */
        const size_t m_pad = (size_t)(M + ZMR - 1) / ZMR * ZMR;
        /* on cache lines: a 64-byte load across two costs a split */
        xp = aligned_alloc(64, m_pad * K);
        dp = malloc(sizeof(float) * m_pad * nc);
        if (!xp || !dp) {
            free(xp);
            free(dp);
            free(xq);
            free(xd);
            return -1;
        }
        pack_x(xq, xd, M, K, xp, dp);
    }
#endif
    /* Rows of W in blocks of 8: the offset terms, scales and sums of 8 rows are then
     * vector operations, and the offsets of a block lie together (see the layout). A
     * block's weights stay in cache while every row of x passes over them, so W is read
     * from memory once however many rows x has. */
#pragma omp parallel for schedule(static)
    for (int n0 = 0; n0 < N; n0 += 8) {
        const int rows = N - n0 < 8 ? N - n0 : 8;
        const uint8_t *wb = (const uint8_t *)w + n0 * w_row;
        /* the block's slices of the metadata, blocked by 8 rows */
        const size_t at = (size_t)n0 * ng;
        const void *sb = (const char *)scale + at * (meta ? 2 : 4);
        const void *ob = (const char *)offset + at * (meta == META_ZERO ? 1 : meta ? 2 : 4);
        /* Constant arguments: each case is its own specialised loop. */
#define BLOCK8(B, H, META)                                                                      \
    block8(wb, w_row, B, H, sb, ng, ob, META, xq, xd, xsum, M, K, gi, bias, rows, n0, N, y, \
           y_bf16)
#define BY_META(B, H)                  \
    (meta == META_ZERO  ? BLOCK8(B, H, META_ZERO) \
     : meta == META_F16 ? BLOCK8(B, H, META_F16)  \
                        : BLOCK8(B, H, META_F32))
#ifdef HAVE_BLOCK8_Z
#define BLOCK8_Z(H, META)                                                                   \
    block8_z(wb, w_row, H, sb, ng, ob, META, xp, dp, xsum, M, K, gi, bias, rows, n0, N, y, \
             y_bf16)
#define BY_META_Z(H)                                 \
    (meta == META_ZERO  ? BLOCK8_Z(H, META_ZERO) \
     : meta == META_F16 ? BLOCK8_Z(H, META_F16)  \
                        : BLOCK8_Z(H, META_F32))
        if (bits == 4 && M >= ZMIN_ROWS && halves)
            BY_META_Z(1);
        else if (bits == 4 && M >= ZMIN_ROWS)
            BY_META_Z(0);
        else if (bits == 4 && halves)
            BY_META(4, 1);
        else if (bits == 4)
            BY_META(4, 0);
        else if (halves) /* int8: the AVX2 blocks (64 bytes a chunk gain nothing here) */
            BY_META(8, 1);
        else
            BY_META(8, 0);
#undef BY_META_Z
#undef BLOCK8_Z
#else
        if (bits == 4 && halves)
            BY_META(4, 1);
        else if (bits == 4)
            BY_META(4, 0);
        else if (halves)
            BY_META(8, 1);
        else
            BY_META(8, 0);
#endif
#undef BY_META
#undef BLOCK8
    }
    free(xp);
    free(dp);
    free(xq);
    free(xd);
    return 0;
}

/* W (N, K) in fp32 or bf16 (out_bf16) from qgemv's operands (same layouts), written in
 * one pass: the dense path of calls with more rows than the kernel serves well
 * multiplies this copy (in torch, unpacking, widening, scaling and offsetting would
 * each be a pass over the matrix: about ten times the time). bf16 rounds as torch does
 * (nearest even). Returns 0, or -1 for shapes qgemv does not take. */
int qdequant(const void *w, int bits, const void *scale, const void *offset, int group,
             int meta, int N, int K, void *out, int out_bf16) {
    if (K % QB || K % group || !(group == 32 || group % QB == 0) || (bits != 4 && bits != 8) ||
        meta < META_F32 || meta > META_ZERO)
        return -1;
    const int ng = K / group;
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        const uint8_t *wn = (const uint8_t *)w + (size_t)n * K * bits / 8;
        const size_t on = (size_t)(n / FS) * ng * FS + n % FS; /* group g at on + 8 g */
        float buf[32];
        for (int k0 = 0; k0 < K; k0 += 32) { /* 32 inputs share a group */
            const int g = k0 / group;
            const float s = load_meta(scale, on + FS * g, meta != META_F32);
            const float o = meta == META_ZERO ? zero_offset(scale, offset, on + FS * g, bits)
                                              : load_meta(offset, on + FS * g, meta == META_F16);
            float *yk = out_bf16 ? buf : (float *)out + (size_t)n * K + k0;
            if (bits == 4) { /* inputs k0..k0+31 are the low or the high nibbles of a chunk */
                const uint8_t *b = wn + (k0 / QB) * 32;
                const int shift = (k0 % QB) ? 4 : 0;
#pragma omp simd
                for (int j = 0; j < 32; j++) yk[j] = s * (float)((b[j] >> shift) & 15) + o;
            } else {
                const int8_t *q = (const int8_t *)wn + k0;
#pragma omp simd
                for (int j = 0; j < 32; j++) yk[j] = s * (float)q[j] + o;
            }
            if (out_bf16) {
                uint16_t *yb = (uint16_t *)out + (size_t)n * K + k0;
#pragma omp simd
                for (int j = 0; j < 32; j++) yb[j] = f32_to_bf16(buf[j]);
            }
        }
    }
    return 0;
}
