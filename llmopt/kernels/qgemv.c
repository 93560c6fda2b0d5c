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
 * weights of a block of 8 rows of W are unpacked once per chunk for two rows of x
 * (block8, AVX2), or, with AVX-512 VNNI, a tile of 16 rows of W is transposed once for
 * every row of x (tile16). Each row of x goes through the same arithmetic whichever
 * runs it and whatever the rows beside it (see "The arithmetic every block below
 * shares"), so that a request's result does not depend on what shares its step. Where
 * the CPU has AMX-INT8, calls of AMX_MIN_ROWS rows or more go to qgemm_amx.c instead:
 * the same quantized x, the same integer products on AMX tiles, the same float
 * arithmetic after them.
 *
 * Layouts (row-major, one row of W after the other):
 *   bits 4: (N, K / 2) bytes; per 64 inputs, 32 bytes: byte j holds input j (low
 *           nibble) and input j + 32 (high), q in 0..15. K % 64 == 0.
 *   bits 5, 6: (N, bits K / 8) bytes; per 64 inputs, 32 + 8 (bits - 4) bytes: the 32
 *           bytes of bits 4 (the low 4 bits of each code), then a plane per higher bit,
 *           a little-endian uint64 whose bit j is that bit of input j's code, q in
 *           0 .. 2^bits - 1: GGUF's Q5_0, Q5_1, Q5_K and Q6_K run at their own bytes,
 *           unpacked to the int4 arithmetic (a pair of products is at most
 *           2 * 63 * 127, inside int16, as int4's). K % 64 == 0.
 *   bits 8: (N, K) int8 holding q - 128 (offset adjusted by the caller). K % 32 == 0.
 * codebook: CODEBOOK_NONE, or with bits 4 CODEBOOK_E2M1: each nibble is an FP4 (e2m1)
 *   value, sign and magnitude, which the unpacking maps through a 16-entry table to
 *   the unsigned code q = 12 + 2 * value (0 .. 24), so that everything after the
 *   unpacking is the int4 arithmetic with zero point 12 (the caller's scale is the
 *   block scale / 2): MXFP4 and NVFP4 blocks run packed, at int4's bytes.
 * scale, offset: per row and group of `group` inputs (16, 32 or a multiple of 64), blocked by
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
 *   META_K    a GGUF K-quant's own numbers: per group an int8 sub-scale sc and
 *             sub-minimum m, per 256-weight super-block fp16 factors d and dmin,
 *             scale = d * sc and offset = dmin * m (each exact in fp32: 11 bits times
 *             8; int8 codes add base * scale, exact too). A block of 8 rows holds
 *             scale (K / group, 2, 8) int8 (sc, then m) and offset (K / 256, 2, 8)
 *             fp16 (d, then dmin). Q4_K then reads 2.5 bytes of
 *             metadata per 32 weights instead of fp32's 8, Q6_K 2.25 per 16 instead of 8.
 * x: (M, K) fp32 or bf16; perm: (K,) int64 or NULL: W's column k multiplies input
 *   perm[k] (GPTQ's act-order), gathered as x is quantized, at no extra pass;
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

enum { META_F32 = 0, META_F16 = 1, META_ZERO = 2, META_K = 3 }; /* scale and offset forms */
#define K_SUPER 256 /* weights of a K-quant super-block: META_K's d and dmin */
enum { CODEBOOK_NONE = 0, CODEBOOK_E2M1 = 1 };       /* what a 4-bit code stands for */

/* CODEBOOK_E2M1's table: nibble (sign bit 3, magnitude index 0-2) -> 12 + 2 * value, the
 * values 0, 0.5, 1, 1.5, 2, 3, 4, 6 and their negatives. */
static const uint8_t E2M1_CODES[16] = {12, 13, 14, 15, 16, 18, 20, 24,
                                       12, 11, 10, 9,  8,  6,  4,  0};

/* A 4-bit code's integer: itself, or its e2m1 table entry. */
static inline int code4(int nibble, int e2m1) { return e2m1 ? E2M1_CODES[nibble] : nibble; }

/* Bytes of a row of W per 64-input chunk: 32, 40 or 64. */
static inline size_t chunk_bytes(int bits) { return (size_t)QB * bits / 8; }

/* The code of input j (0..63) of chunk c of a row of W (wn) in the 4-, 5- or 6-bit
 * layout. */
static inline int packed_code(const uint8_t *wn, int c, int j, int bits, int e2m1) {
    const uint8_t *ch = wn + (size_t)c * chunk_bytes(bits);
    int q = code4((ch[j % 32] >> (j < 32 ? 0 : 4)) & 15, e2m1);
    for (int p = 0; p < bits - 4; p++) q |= ((ch[32 + 8 * p + j / 8] >> (j % 8)) & 1) << (4 + p);
    return q;
}

/* Bytes per element of the scales and of the offsets (or zero points) in form `meta`. */
static inline size_t scale_bytes(int meta) { return meta == META_F32 ? 4 : 2; }
static inline size_t offset_bytes(int meta) { return meta == META_ZERO ? 1 : scale_bytes(meta); }

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
 * the rounded inputs per weight group xsum (K / group,). With perm (K,), input k is
 * x[perm[k]]: W's columns in GPTQ's act-order, the gather done as the row is read. */
static void quantize_row(const void *x, int x_bf16, const int64_t *perm, int K, int group,
                         int8_t *xq, float *xd, float *xsum) {
    float buf[QB];
    for (int g = 0; g < K / group; g++) xsum[g] = 0.0f;
    for (int c = 0; c < K / QB; c++) {
        float amax = 0.0f;
        for (int j = 0; j < QB; j++) {
            const int64_t k = perm ? perm[c * QB + j] : c * QB + j;
            buf[j] = x_bf16 ? bf16_to_f32(((const uint16_t *)x)[k]) : ((const float *)x)[k];
        }
#pragma omp simd reduction(max : amax)
        for (int j = 0; j < QB; j++) amax = amax > fabsf(buf[j]) ? amax : fabsf(buf[j]);
        const float d = amax / 127.0f;
        const float inv = d > 0.0f ? 1.0f / d : 0.0f;
        xd[c] = d;
        int8_t *q = xq + c * QB;
        int s[4]; /* sums of the rounded quarters (exact: any grouping of them is too) */
        for (int p = 0; p < 4; p++) {
            int sp = 0;
#pragma omp simd reduction(+ : sp)
            for (int j = 16 * p; j < 16 * p + 16; j++) {
                q[j] = (int8_t)nearbyintf(buf[j] * inv);
                sp += q[j];
            }
            s[p] = sp;
        }
        if (group == 16) {
            for (int p = 0; p < 4; p++) xsum[4 * c + p] = d * (float)s[p];
        } else if (group == 32) {
            xsum[2 * c] = d * (float)(s[0] + s[1]);
            xsum[2 * c + 1] = d * (float)(s[2] + s[3]);
        } else {
            xsum[c * QB / group] += d * (float)(s[0] + s[1] + s[2] + s[3]);
        }
    }
}

/* Rows of W a block computes together, and the stride of its per-row metadata (the
 * metadata layouts hold a group's values for 8 rows side by side). */
#define FS 8

/* META_K's groups a super-block (1 for the other forms, which have none). */
static inline int groups_per_super(int meta, int group) {
    return meta == META_K ? K_SUPER / group : 1;
}

/* Bytes of scales and of offsets a row of W has, in any form (ng groups a row; gps
 * groups a K-quant super-block, for META_K: two int8 a group, two fp16 a super-block). */
static inline size_t scale_row_bytes(int meta, int ng) { return (size_t)ng * scale_bytes(meta); }
static inline size_t offset_row_bytes(int meta, int ng, int gps) {
    return meta == META_K ? (size_t)4 * (ng / gps) : (size_t)ng * offset_bytes(meta);
}

/* Where the scales and the offsets of the block of rows 8 n8 .. 8 n8 + 7 start. */
static inline const void *scale_block(const void *scale, int meta, int ng, size_t n8) {
    return (const char *)scale + n8 * FS * scale_row_bytes(meta, ng);
}
static inline const void *offset_block(const void *offset, int meta, int ng, int gps, size_t n8) {
    return (const char *)offset + n8 * FS * offset_row_bytes(meta, ng, gps);
}

/* Row i's scale and offset of group g in a block's metadata (sb, ob: the block's
 * starts), in fp32. */
static inline float block_scale(const void *sb, const void *ob, int meta, int gps, int g, int i) {
    if (meta == META_K)
        return f16_to_f32(((const uint16_t *)ob)[FS * 2 * (g / gps) + i]) *
               (float)((const int8_t *)sb)[FS * 2 * g + i];
    return load_meta(sb, FS * g + i, meta != META_F32);
}
static inline float block_offset(const void *sb, const void *ob, int meta, int bits, int gps,
                                 int g, int i) {
    if (meta == META_K) /* int8 codes are stored as q - 128: base * scale puts it back */
        return f16_to_f32(((const uint16_t *)ob)[FS * (2 * (g / gps) + 1) + i]) *
                   (float)((const int8_t *)sb)[FS * (2 * g + 1) + i] +
               code_base(bits) * block_scale(sb, ob, meta, gps, g, i);
    if (meta == META_ZERO) return zero_offset(sb, ob, FS * g + i, bits);
    return load_meta(ob, FS * g + i, meta == META_F16);
}

#ifdef __AVX2__
/* The arithmetic every block below shares, so that a row of x gets the same bits from
 * each of them whatever the rows beside it (and from one row to the next call):
 *   - a unit is a group for groups of 16 and 32 (`units` of them a 64-input chunk),
 *     else a whole chunk (units = 1);
 *   - I[m, n, u] = dot(q[n, u], xq[m, u]), exact in int32 (however the lanes split it);
 *   - F[m, n, u] = xd[m, chunk] * scale[n, group] in fp32 (xd alone with a row scale);
 *   - v = fma(float(I), F, v) over the units in order, from 0: one chain per output;
 *   - the epilogue (store8): y = v * row scale + bias + sum_g offset[n, g] * xsum[m, g].
 * Only the order of integer additions differs between the blocks, and that is exact. */

/* 32 bits of a plane (bit j: byte j) as 32 bytes, `value` where the bit is set, else 0:
 * what a 5- or 6-bit layout's plane adds to the unpacked low nibbles. */
static inline __m256i plane_bytes32(uint32_t m, char value) {
#if defined(__AVX512BW__) && defined(__AVX512VL__) && !defined(LLMOPT_QGEMV_AVX2)
    return _mm256_maskz_mov_epi8((__mmask32)m, _mm256_set1_epi8(value));
#else /* byte j takes byte j / 8 of m, then tests its bit j % 8 */
    const __m256i spread = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2,
                                            2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
    const __m256i bit = _mm256_set1_epi64x((long long)0x8040201008040201ULL);
    const __m256i v = _mm256_and_si256(_mm256_shuffle_epi8(_mm256_set1_epi32((int)m), spread), bit);
    return _mm256_and_si256(_mm256_cmpeq_epi8(v, bit), _mm256_set1_epi8(value));
#endif
}

/* Adds a 5- or 6-bit chunk's planes (at src + 32) to its unpacked low nibbles: lo holds
 * inputs 0-31, hi inputs 32-63. */
static inline void add_planes(__m256i *lo, __m256i *hi, const uint8_t *src, int bits) {
    for (int p = 0; p < bits - 4; p++) {
        uint64_t plane;
        memcpy(&plane, src + 32 + 8 * p, 8);
        *lo = _mm256_or_si256(*lo, plane_bytes32((uint32_t)plane, (char)(16 << p)));
        *hi = _mm256_or_si256(*hi, plane_bytes32((uint32_t)(plane >> 32), (char)(16 << p)));
    }
}

/* The integer partial sums of one chunk of a row of W (its bytes at wc) against `nrows`
 * (1 or 2, a constant once inlined) rows of x: d[r][u], 8 int32 lanes for each of the
 * chunk's `units` units (lane i holds inputs 4i .. 4i + 3 of a 32-input half: a
 * 16-input unit keeps its half's lanes 0-3 or 4-7, the others zeroed); a unit's dot
 * product is the sum of its lanes. The weights are loaded and unpacked once for both rows. Without VNNI, products
 * are int16 pair sums (vpmaddubsw: 32 multiply-adds in one instruction; it wants one
 * unsigned operand, so int8 weights give |w| and each row of x takes w's sign; a pair
 * is at most 2 * 128 * 127, inside int16), then int32 (vpmaddwd with ones). */
static inline __attribute__((always_inline)) void chunk_dots(__m256i d[2][4], int nrows,
                                                             const uint8_t *wc, int bits,
                                                             int e2m1, int units,
                                                             const int8_t *xa,
                                                             const int8_t *xb) {
    const __m256i zero = _mm256_setzero_si256();
    __m256i w0, w1, s0 = zero, s1 = zero;
    if (bits != 8) { /* byte j: input j in the low nibble, j + 32 in the high one */
        const __m256i low = _mm256_set1_epi8(0x0f);
        const __m256i v = _mm256_loadu_si256((const __m256i *)wc);
        w0 = _mm256_and_si256(v, low);
        w1 = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
        if (e2m1) { /* nibbles to codes: a byte shuffle is a 16-entry table lookup */
            const __m256i t =
                _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)E2M1_CODES));
            w0 = _mm256_shuffle_epi8(t, w0);
            w1 = _mm256_shuffle_epi8(t, w1);
        }
        add_planes(&w0, &w1, wc, bits);
    } else {
        s0 = _mm256_loadu_si256((const __m256i *)wc);
        s1 = _mm256_loadu_si256((const __m256i *)(wc + 32));
        w0 = _mm256_abs_epi8(s0);
        w1 = _mm256_abs_epi8(s1);
    }
    for (int r = 0; r < nrows; r++) {
        const int8_t *xc = r ? xb : xa;
        __m256i x0 = _mm256_loadu_si256((const __m256i *)xc);
        __m256i x1 = _mm256_loadu_si256((const __m256i *)(xc + 32));
        if (bits == 8) {
            x0 = _mm256_sign_epi8(x0, s0);
            x1 = _mm256_sign_epi8(x1, s1);
        }
#ifdef DPBUSD
        if (units > 1) {
            d[r][0] = DPBUSD(zero, w0, x0);
            d[r][1] = DPBUSD(zero, w1, x1);
        } else {
            d[r][0] = DPBUSD(DPBUSD(zero, w0, x0), w1, x1);
        }
#else
        const __m256i ones = _mm256_set1_epi16(1);
        const __m256i h0 = _mm256_maddubs_epi16(w0, x0), h1 = _mm256_maddubs_epi16(w1, x1);
        if (units > 1) {
            d[r][0] = _mm256_madd_epi16(h0, ones);
            d[r][1] = _mm256_madd_epi16(h1, ones);
        } else { /* 4- to 6-bit: the halves add in int16 (|sum| <= 4 * 63 * 127); int8's
                  * would overflow */
            d[r][0] = bits != 8 ? _mm256_madd_epi16(_mm256_add_epi16(h0, h1), ones)
                                : _mm256_add_epi32(_mm256_madd_epi16(h0, ones),
                                                   _mm256_madd_epi16(h1, ones));
        }
#endif
        if (units == 4) { /* quarters: each half's lanes 0-3, then 4-7 */
            d[r][3] = _mm256_blend_epi32(d[r][1], zero, 0x0f);
            d[r][2] = _mm256_blend_epi32(d[r][1], zero, 0xf0);
            d[r][1] = _mm256_blend_epi32(d[r][0], zero, 0x0f);
            d[r][0] = _mm256_blend_epi32(d[r][0], zero, 0xf0);
        }
    }
}

/* The lane sums of a[0..7], as lane i of the result (the integer sum8). */
static inline __m256i sum8i(const __m256i a[8]) {
    const __m256i s01 = _mm256_hadd_epi32(a[0], a[1]), s23 = _mm256_hadd_epi32(a[2], a[3]);
    const __m256i s45 = _mm256_hadd_epi32(a[4], a[5]), s67 = _mm256_hadd_epi32(a[6], a[7]);
    const __m256i s0123 = _mm256_hadd_epi32(s01, s23), s4567 = _mm256_hadd_epi32(s45, s67);
    return _mm256_add_epi32(_mm256_permute2x128_si256(s0123, s4567, 0x20),
                            _mm256_permute2x128_si256(s0123, s4567, 0x31));
}

/* v[r] (8 lanes: the block's rows of W) for `nrows` (a constant) rows of x, xa and xb,
 * their chunk scales da and db: each row of W (wi[i]) once for both rows of x, chunk
 * after chunk (one stream at a time, as the prefetcher likes), its units' lane sums kept
 * in lanes (nu, 8, 8 int32 per row of x); then per unit one transpose-add (sum8i) into a
 * vector of 8 dot products, folded into v by the shared arithmetic. sf: the block's fp32
 * scales, (ng, 8). */
static inline __attribute__((always_inline)) void rows8(__m256 v[2], int nrows,
                                                        const uint8_t *const wi[8], int bits,
                                                        int e2m1, int units, int per_row,
                                                        const float *sf,
                                                        const int *gi, const int8_t *xa,
                                                        const int8_t *xb, const float *da,
                                                        const float *db, int nc,
                                                        __m256i *lanes) {
    const int nu = units * nc;
    for (int i = 0; i < 8; i++)
        for (int c = 0; c < nc; c++) {
            __m256i d[2][4];
            chunk_dots(d, nrows, wi[i] + c * chunk_bytes(bits), bits, e2m1, units, xa + c * QB,
                       xb + c * QB);
            for (int r = 0; r < nrows; r++)
                for (int h = 0; h < units; h++)
                    lanes[((size_t)r * nu + units * c + h) * 8 + i] = d[r][h];
        }
    v[0] = v[1] = _mm256_setzero_ps();
    for (int r = 0; r < nrows; r++) {
        const float *dr = r ? db : da;
        for (int u = 0; u < nu; u++) {
            const int c = u / units, g = units > 1 ? u : gi[c];
            const __m256 xdc = _mm256_broadcast_ss(dr + c);
            const __m256 f = per_row ? xdc : _mm256_mul_ps(xdc, _mm256_loadu_ps(sf + FS * g));
            const __m256i dots = sum8i(lanes + ((size_t)r * nu + u) * 8);
            v[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dots), f, v[r]);
        }
    }
}

/* 8 consecutive metadata values from element i, fp16 (f16 = 1) or fp32. */
static inline __m256 load_meta8(const void *p, size_t i, int f16) {
    if (f16) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)p + i)));
    return _mm256_loadu_ps((const float *)p + i);
}

/* 8 int8 values from p, in fp32. */
static inline __m256 load_i8x8(const void *p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}

/* block_scale and block_offset for the block's 8 rows at once (the same fp32 numbers:
 * widened, or products and differences exact in fp32). */
static inline __m256 scale8(const void *sb, const void *ob, int meta, int gps, int g) {
    if (meta == META_K)
        return _mm256_mul_ps(load_meta8(ob, FS * 2 * (g / gps), 1),
                             load_i8x8((const int8_t *)sb + FS * 2 * g));
    return load_meta8(sb, FS * g, meta != META_F32);
}
static inline __m256 offset8(const void *sb, const void *ob, int meta, int bits, int gps, int g) {
    if (meta == META_K)
        return _mm256_add_ps(_mm256_mul_ps(load_meta8(ob, FS * (2 * (g / gps) + 1), 1),
                                           load_i8x8((const int8_t *)sb + FS * (2 * g + 1))),
                             _mm256_mul_ps(_mm256_set1_ps(code_base(bits)),
                                           scale8(sb, ob, meta, gps, g)));
    if (meta != META_ZERO) return load_meta8(ob, FS * g, meta == META_F16);
    const __m128i z = _mm_loadl_epi64((const __m128i *)((const uint8_t *)ob + FS * g));
    const __m256 zf = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(z));
    return _mm256_mul_ps(load_meta8(sb, FS * g, 1),
                         _mm256_sub_ps(_mm256_set1_ps(code_base(bits)), zf));
}

/* A block's scales (offsets = 0) or offsets (1) for every group in fp32: dst[g * stride
 * .. + 7], g < ng. The form is tested once, outside the loop: per group, the test costs
 * as much as the loads (a tile of 16 rows x 576 inputs reads 18 groups' metadata for
 * about 4.6 KB of weights). */
static inline __attribute__((always_inline)) void expand_meta(float *dst, size_t stride,
                                                               const void *sb, const void *ob,
                                                               int meta, int bits, int gps,
                                                               int ng, int offsets) {
    if (meta == META_K) {
        for (int g = 0; g < ng; g++)
            _mm256_storeu_ps(dst + stride * g, offsets ? offset8(sb, ob, META_K, bits, gps, g)
                                                       : scale8(sb, ob, META_K, gps, g));
    } else if (!offsets || meta != META_ZERO) {
        const void *p = offsets ? ob : sb;
        const int f16 = offsets ? meta == META_F16 : meta != META_F32;
        for (int g = 0; g < ng; g++) _mm256_storeu_ps(dst + stride * g, load_meta8(p, FS * g, f16));
    } else {
        for (int g = 0; g < ng; g++)
            _mm256_storeu_ps(dst + stride * g, offset8(sb, ob, META_ZERO, bits, gps, g));
    }
}

/* What the epilogue needs of a block of 8 rows of W (`rows` of them real): the row
 * scales (1 unless one scale covers a row), the bias, and the offsets in fp32, (ng, 8);
 * with the scales in fp32 too, (ng, 8), for the units' factors. */
typedef struct {
    __m256 row_scale, bias;
    int rows;
} Block8;

static inline Block8 block8_meta(const void *sb, const void *ob, int meta, int bits, int gps,
                                 int ng, int per_row, const float *bias, int n0, int rows,
                                 float *sf, float *of) {
    float tail[8];
    for (int i = 0; i < 8; i++) tail[i] = i < rows && bias ? bias[n0 + i] : 0.0f;
    expand_meta(sf, FS, sb, ob, meta, bits, gps, ng, 0);
    expand_meta(of, FS, sb, ob, meta, bits, gps, ng, 1);
    const Block8 b = {per_row ? scale8(sb, ob, meta, gps, 0) : _mm256_set1_ps(1.0f),
                      _mm256_loadu_ps(tail), rows};
    return b;
}

/* One row of x's outputs for a block of 8 rows of W, from its accumulated v:
 * y[at .. at + rows - 1] = v * row_scale + bias + sum_g of[:, g] * xs[g], in fp32 or
 * bf16. */
static inline void store8(__m256 v, const Block8 *blk, const float *of, const float *xs, int ng,
                          size_t at, void *y, int y_bf16) {
    v = _mm256_fmadd_ps(v, blk->row_scale, blk->bias);
    for (int g = 0; g < ng; g++)
        v = _mm256_fmadd_ps(_mm256_loadu_ps(of + FS * g), _mm256_broadcast_ss(xs + g), v);
    float out[8];
    _mm256_storeu_ps(out, v);
    for (int i = 0; i < blk->rows; i++) {
        if (y_bf16)
            ((uint16_t *)y)[at + i] = f32_to_bf16(out[i]);
        else
            ((float *)y)[at + i] = out[i];
    }
}

/* y[m, n0 .. n0 + 7] for a block of 8 rows of W (`rows` of them real) and every row m of
 * x, two rows of x at a time (rows8). scale and offset are the block's (K / group, 8)
 * slices of the blocked layouts, so the factors, offsets and epilogue are vector
 * operations over the block's 8 rows, and one transpose-add (sum8i) per unit turns the
 * rows' lane sums into a vector of 8 dot products (a horizontal sum per row would cost
 * as much as the row's dot products at K = 576). */
static inline __attribute__((always_inline)) void block8(
    const uint8_t *w, size_t w_row, int bits, int e2m1, int units, const void *scale, int ng,
    const void *offset, int meta, int gps, const int8_t *xq, const float *xd, const float *xsum,
    int M,
    int K, const int *gi, const float *bias, int rows, int n0, int N, void *y, int y_bf16) {
    const int nc = K / QB;
    const int per_row = units == 1 && gi[nc - 1] == 0; /* one scale for the whole row */
    float sf[FS * ng], of[FS * ng];
    const Block8 blk =
        block8_meta(scale, offset, meta, bits, gps, ng, per_row, bias, n0, rows, sf, of);
    const uint8_t *wi[8]; /* a partial block repeats its first row; those lanes go unstored */
    for (int i = 0; i < 8; i++) wi[i] = w + (size_t)(i < rows ? i : 0) * w_row;
    __m256i lanes[2 * 8 * units * nc]; /* rows8's, for two rows of x */
    for (int m = 0; m < M; m += 2) {
        const int8_t *xa = xq + (size_t)m * K;
        const float *da = xd + (size_t)m * nc;
        __m256 v[2];
        if (m + 1 < M)
            rows8(v, 2, wi, bits, e2m1, units, per_row, sf, gi, xa, xa + K, da, da + nc, nc,
                  lanes);
        else
            rows8(v, 1, wi, bits, e2m1, units, per_row, sf, gi, xa, xa, da, da, nc, lanes);
        for (int r = 0; r < 2 && m + r < M; r++)
            store8(v[r], &blk, of, xsum + (size_t)(m + r) * ng, ng, (size_t)(m + r) * N + n0, y,
                   y_bf16);
    }
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__) && \
    !defined(LLMOPT_QGEMV_AVX2) /* a build for testing the AVX2 blocks (qgemv.load) */
/* AVX-512 VNNI, for every call: a GEMM micro-kernel whose lanes are 16 rows of W
 * (outputs) rather than inputs. A tile of 16 rows of W is transposed, each chunk into
 * 16 vectors (t = 0..15) holding the 16 rows' codes for inputs 4t .. 4t + 3 (as
 * unsigned bytes: int4 codes are, int8 ones are made so by adding 128); then every row
 * of x passes over it, one vpdpbusd per vector against x's 4 inputs broadcast, into
 * int32 accumulators that hold a unit's exact dot products for 16 outputs (int8 then
 * subtracts 128 times the unit's sum of x). A unit then costs one conversion, one
 * multiply and one FMA per 16 outputs instead of per output, and the transpose is paid
 * once for all rows of x (at one row it costs about what block8's per-unit reductions
 * do). The arithmetic is block8's (the integer sums are exact): a CPU without these
 * instructions computes the same bits. */
#define QT_ROWS 8 /* rows of x per register block: 8 int32 and 8 fp32 accumulators */

/* In-lane steps of a 4 x 4 dword transpose over groups of 4 vectors (unpacks, cheaper
 * than cross-lane permutes): v[4q + j]'s 128-bit lane l then holds dword j of lane l
 * of v[4q .. 4q + 3]. */
static inline void transpose4_in_lanes(__m512i *v, int n) {
    for (int q = 0; q < n; q += 4) {
        const __m512i t0 = _mm512_unpacklo_epi32(v[q], v[q + 1]);
        const __m512i t1 = _mm512_unpackhi_epi32(v[q], v[q + 1]);
        const __m512i t2 = _mm512_unpacklo_epi32(v[q + 2], v[q + 3]);
        const __m512i t3 = _mm512_unpackhi_epi32(v[q + 2], v[q + 3]);
        v[q] = _mm512_unpacklo_epi64(t0, t2);
        v[q + 1] = _mm512_unpackhi_epi64(t0, t2);
        v[q + 2] = _mm512_unpacklo_epi64(t1, t3);
        v[q + 3] = _mm512_unpackhi_epi64(t1, t3);
    }
}

/* Chunk c of the tile's 16 rows (wr[i]) into out[t], t = 0..15: lane i holds row i's
 * codes for inputs 4t .. 4t + 3. int8: vector i is row i's 16 dwords; 4 x 4 blocks are
 * transposed in lanes, then two levels of 128-bit lane shuffles (0x88: lanes 0 and 2 of
 * each source, 0xdd: lanes 1 and 3) gather them. int4: the packed bytes are transposed
 * before they are unpacked (half the data): vector p holds two rows' 8 dwords (rows p
 * and p + 4, or p + 4 and p + 8 from p = 4, so that the lanes come out in row order;
 * dword t packs inputs 4t .. 4t + 3 and 32 + 4t .. 32 + 4t + 3), one shuffle level
 * gathers, and vector t's low nibbles are then out[t], its high ones out[8 + t]. */
static inline __attribute__((always_inline)) void transpose_chunk(const uint8_t *const wr[16],
                                                                   int bits, int e2m1, int c,
                                   __m512i out[16]) {
    if (bits == 8) {
        __m512i v[16], h[16];
        for (int i = 0; i < 16; i++) /* q - 128 as stored, to the code q */
            v[i] = _mm512_xor_si512(_mm512_loadu_si512((const void *)(wr[i] + (size_t)c * QB)),
                                    _mm512_set1_epi8((char)0x80));
        transpose4_in_lanes(v, 16);
        for (int half = 0; half < 2; half++)
            for (int j = 0; j < 4; j++) {
                const __m512i a = v[8 * half + j], b = v[8 * half + 4 + j];
                h[8 * half + j] = _mm512_shuffle_i32x4(a, b, 0x88);
                h[8 * half + 4 + j] = _mm512_shuffle_i32x4(a, b, 0xdd);
            }
        for (int j = 0; j < 8; j++) {
            out[j] = _mm512_shuffle_i32x4(h[j], h[8 + j], 0x88);
            out[8 + j] = _mm512_shuffle_i32x4(h[j], h[8 + j], 0xdd);
        }
        return;
    }
    __m512i z[8];
    for (int p = 0; p < 8; p++) {
        const int a = p < 4 ? p : p + 4; /* rows a and a + 4 */
        const size_t at = (size_t)c * chunk_bytes(bits);
        const __m256i lo = _mm256_loadu_si256((const __m256i *)(wr[a] + at));
        const __m256i hi = _mm256_loadu_si256((const __m256i *)(wr[a + 4] + at));
        z[p] = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
    }
    transpose4_in_lanes(z, 8);
    const __m512i low = _mm512_set1_epi8(0x0f);
    for (int j = 0; j < 4; j++)
        for (int odd = 0; odd < 2; odd++) {
            const int t = 4 * odd + j;
            const __m512i g = _mm512_shuffle_i32x4(z[j], z[4 + j], odd ? 0xdd : 0x88);
            out[t] = _mm512_and_si512(g, low);
            out[8 + t] = _mm512_and_si512(_mm512_srli_epi16(g, 4), low);
        }
    if (e2m1) { /* nibbles to codes, as chunk_dots does */
        const __m512i t = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)E2M1_CODES));
        for (int j = 0; j < 16; j++) out[j] = _mm512_shuffle_epi8(t, out[j]);
    }
}

/* transpose_chunk for 5- and 6-bit codes: the nibbles as int4's, then each plane's bits
 * added. */
static inline __attribute__((always_inline)) void transpose_wide_chunk(const uint8_t *const wr[16],
                                                                       int bits, int c,
                                                                       __m512i out[16]) {
    transpose_chunk(wr, bits, 0, c, out);
    for (int p = 0; p < bits - 4; p++) { /* out[t]'s lane i: bits 4t .. 4t + 3 of row i's plane */
        uint64_t hb[16];
        for (int i = 0; i < 16; i++) memcpy(&hb[i], wr[i] + c * chunk_bytes(bits) + 32 + 8 * p, 8);
        const __m512i h0 = _mm512_loadu_si512(hb), h1 = _mm512_loadu_si512(hb + 8);
        /* lane i: the low (inputs 0-31) or high (32-63) half of row i's bits */
        const __m512i lo = _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_cvtepi64_epi32(h0)),
                                              _mm512_cvtepi64_epi32(h1), 1);
        const __m512i hi = _mm512_inserti64x4(
            _mm512_castsi256_si512(_mm512_cvtepi64_epi32(_mm512_srli_epi64(h0, 32))),
            _mm512_cvtepi64_epi32(_mm512_srli_epi64(h1, 32)), 1);
        /* 4 bits -> 4 bytes of the plane's value or 0: a 16-entry dword table (vpermd
         * reads an index's low 4 bits) */
        const int v = 16 << p;
        int32_t table[16];
        for (int n = 0; n < 16; n++)
            table[n] = (n & 1 ? v : 0) | (n & 2 ? v << 8 : 0) | (n & 4 ? v << 16 : 0) |
                       (n & 8 ? v << 24 : 0);
        const __m512i spread = _mm512_loadu_si512(table);
        for (int t = 0; t < 8; t++) {
            out[t] = _mm512_or_si512(
                out[t], _mm512_permutexvar_epi32(_mm512_srli_epi32(lo, 4 * t), spread));
            out[8 + t] = _mm512_or_si512(
                out[8 + t], _mm512_permutexvar_epi32(_mm512_srli_epi32(hi, 4 * t), spread));
        }
    }
}

/* Software prefetch of the tile PREFETCH_TILES ahead, its weights a share per chunk
 * and its metadata at the start: the transpose reads 16 rows side by side, and the
 * metadata all at once, patterns the hardware prefetcher does not follow, and with one
 * row of x the arithmetic is too short to hide a miss. Into L2 (prefetcht1), two tiles
 * ahead: L2 keeps more misses in flight than L1, and a tile of one row of x is
 * computed in about a memory latency (BENCHMARKS.md, "Prefetch distance"). (An asm
 * statement: GCC drops the __builtin_prefetch of these loops.) */
#define PREFETCH_TILES 2
static inline void prefetch(const char *p, size_t bytes) {
    for (size_t o = 0; o < bytes; o += 64) __asm__ volatile("prefetcht1 %0" : : "m"(*(p + o)));
}

typedef struct {
    const char *at; /* the weights of the tile ahead, or NULL past the end */
    size_t per_chunk, bytes;
} Ahead;

static inline void prefetch_share(Ahead a, int c) {
    const size_t from = (size_t)c * a.per_chunk;
    if (a.at && from < a.bytes)
        prefetch(a.at + from, a.bytes - from < a.per_chunk ? a.bytes - from : a.per_chunk);
}

/* v[r] (16 lanes: the tile's rows of W) for `nr` (a constant) rows of x from xq (row
 * stride K) and their chunk scales xd (row stride nc): per unit, the int32 dot products
 * over the unit's vectors of the transposed tile (wt, or with wr, the tile's rows, each
 * chunk transposed here as the pass reaches it), then block8's factor and FMA. sv: the
 * tile's fp32 scales per group, (ng, 16); xi: for int8, each row's sums of xq per unit
 * (row stride nu). */
static inline __attribute__((always_inline)) void tile_pass(
    __m512 v[QT_ROWS], int nr, const __m512i *wt, const uint8_t *const *wr, Ahead ahead,
    int bits, int e2m1, int units, int per_row, const __m512 *sv, const int *gi,
    const int8_t *xq, const float *xd, const int32_t *xi, int K, int nc) {
    const int nu = units * nc, per_unit = 16 / units; /* vectors of 4 inputs a unit */
    for (int r = 0; r < nr; r++) v[r] = _mm512_setzero_ps();
    for (int c = 0; c < nc; c++) {
        __m512i own[16];
        const __m512i *wc = wt + (size_t)c * 16;
        if (wr) { /* fused: this chunk transposed here */
            prefetch_share(ahead, c);
            transpose_chunk(wr, bits, e2m1, c, own);
            wc = own;
        }
        const int8_t *xc = xq + (size_t)c * QB;
        for (int h = 0; h < units; h++) {
            __m512i acc[QT_ROWS];
            for (int r = 0; r < nr; r++) acc[r] = _mm512_setzero_si512();
            const int t0 = per_unit * h, t1 = t0 + per_unit;
#pragma GCC unroll 16 /* unrolled, the accumulators stay put (rolled, GCC copies them) */
            for (int t = t0; t < t1; t++) {
                const __m512i wv = _mm512_load_si512(wc + t);
                for (int r = 0; r < nr; r++) {
                    int32_t x4; /* inputs 4t .. 4t + 3 of row r, broadcast */
                    memcpy(&x4, xc + (size_t)r * K + 4 * t, 4);
                    acc[r] = _mm512_dpbusd_epi32(acc[r], wv, _mm512_set1_epi32(x4));
                }
            }
            const int u = units * c + h;
            const __m512 s = sv[units > 1 ? u : gi[c]];
            if (bits == 8) /* the codes were q, the weights q - 128 */
                for (int r = 0; r < nr; r++)
                    acc[r] = _mm512_sub_epi32(acc[r],
                                              _mm512_set1_epi32(128 * xi[(size_t)r * nu + u]));
            for (int r = 0; r < nr; r++) {
                const __m512 xdc = _mm512_set1_ps(xd[(size_t)r * nc + c]);
                const __m512 f = per_row ? xdc : _mm512_mul_ps(xdc, s);
                v[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[r]), f, v[r]);
            }
        }
    }
}

/* y[m, n0 .. n0 + 15] for a tile of up to 16 rows of W and every row of x (layouts and
 * epilogue as block8's, whose 8-row metadata slices the tile's two halves are). */
static inline __attribute__((always_inline)) void tile16(
    const uint8_t *w, size_t w_row, int bits, int e2m1, int units, const void *scale,
    const void *offset, int meta, int gps, int ng, const int8_t *xq, const float *xd,
    const float *xsum, const int32_t *xi, int M, int K, const int *gi, const float *bias, int n0,
    int N, void *y, int y_bf16,
    __m512i *wt) { /* per-thread room for the transposed tile, (nc, 16) vectors */
    const int nc = K / QB, rows = N - n0 < 16 ? N - n0 : 16;
    const int per_row = units == 1 && gi[nc - 1] == 0;
    const uint8_t *wr[16]; /* a partial tile repeats its first row; those lanes go unstored */
    for (int i = 0; i < 16; i++) wr[i] = w + (size_t)(n0 + (i < rows ? i : 0)) * w_row;
    /* One pass of x's rows (M <= QT_ROWS, decode) transposes each chunk as it goes,
     * so that loading the weights overlaps the arithmetic; more passes transpose the
     * whole tile first, once for all of them. */
    /* 5- and 6-bit codes transpose the whole tile first even then: their planes' code
     * inside the fused pass made GCC compile the 4-bit pass 10-20% slower. */
    const int fused = M <= QT_ROWS && (bits == 4 || bits == 8);
    const size_t tile_bytes = 16 * w_row, end = (size_t)N * w_row;
    const int ahead_row = n0 + 16 * PREFETCH_TILES;
    const size_t ahead_at = (size_t)ahead_row * w_row;
    const Ahead ahead = {ahead_at < end ? (const char *)w + ahead_at : NULL,
                         (tile_bytes / nc + 63) / 64 * 64,
                         end - ahead_at < tile_bytes ? end - ahead_at : tile_bytes};
    if (ahead.at) { /* the scales and offsets of the tile ahead: bytes a row of each */
        const int next = N - ahead_row < 16 ? N - ahead_row : 16;
        const size_t s_row = scale_row_bytes(meta, ng), o_row = offset_row_bytes(meta, ng, gps);
        prefetch((const char *)scale + (size_t)ahead_row * s_row, (size_t)next * s_row);
        prefetch((const char *)offset + (size_t)ahead_row * o_row, (size_t)next * o_row);
    }
    if (!fused)
        for (int c = 0; c < nc; c++) {
            prefetch_share(ahead, c);
            (bits == 5 || bits == 6) ? transpose_wide_chunk(wr, bits, c, wt + (size_t)c * 16)
                                     : transpose_chunk(wr, bits, e2m1, c, wt + (size_t)c * 16);
        }
    Block8 blk[2];
    __m512 sv[ng];         /* the tile's scales per group, fp32 */
    float of[2 * FS * ng]; /* its two blocks' offsets, (ng, 8) each */
    float sf[2][FS * ng];
    const int nb = rows > 8 ? 2 : 1;
    for (int b = 0; b < nb; b++) {
        const size_t n8 = (size_t)n0 / FS + b;
        blk[b] = block8_meta(scale_block(scale, meta, ng, n8),
                             offset_block(offset, meta, ng, gps, n8), meta, bits, gps, ng, per_row,
                             bias, n0 + 8 * b, rows - 8 * b < 8 ? rows - 8 * b : 8, sf[b],
                             of + b * FS * ng);
    }
    for (int g = 0; g < ng; g++) {
        const __m256 s0 = _mm256_loadu_ps(sf[0] + FS * g);
        const __m256 s1 = nb > 1 ? _mm256_loadu_ps(sf[1] + FS * g) : s0;
        sv[g] = _mm512_insertf32x8(_mm512_castps256_ps512(s0), s1, 1);
    }
    for (int m = 0; m < M; m += QT_ROWS) {
        const int nr = M - m < QT_ROWS ? M - m : QT_ROWS;
        const int8_t *xm = xq + (size_t)m * K;
        const float *dm = xd + (size_t)m * nc;
        const int32_t *im = xi ? xi + (size_t)m * units * nc : NULL;
        __m512 v[QT_ROWS];
        switch (nr) { /* constant row counts: each its own unrolled loop */
#define QT_PASS(R) \
    tile_pass(v, R, wt, fused ? wr : NULL, ahead, bits, e2m1, units, per_row, sv, gi, xm, dm, \
              im, K, nc)
        case 8: QT_PASS(8); break;
        case 7: QT_PASS(7); break;
        case 6: QT_PASS(6); break;
        case 5: QT_PASS(5); break;
        case 4: QT_PASS(4); break;
        case 3: QT_PASS(3); break;
        case 2: QT_PASS(2); break;
        default: QT_PASS(1); break;
#undef QT_PASS
        }
        for (int r = 0; r < nr; r++) {
            const float *xs = xsum + (size_t)(m + r) * ng;
            const size_t at = (size_t)(m + r) * N + n0;
            store8(_mm512_castps512_ps256(v[r]), &blk[0], of, xs, ng, at, y, y_bf16);
            if (nb > 1)
                store8(_mm512_extractf32x8_ps(v[r], 1), &blk[1], of + FS * ng, xs, ng,
                       at + 8, y, y_bf16);
        }
    }
}
#define HAVE_TILE16 1
#endif
#else
/* Without AVX2: the same arithmetic one output at a time. */
static inline void block8(const uint8_t *w, size_t w_row, int bits, int e2m1, int units,
                          const void *scale, int ng, const void *offset, int meta, int gps,
                          const int8_t *xq, const float *xd, const float *xsum, int M, int K,
                          const int *gi, const float *bias, int rows, int n0, int N, void *y,
                          int y_bf16) {
    const int nc = K / QB;
    const int per_row = units == 1 && gi[nc - 1] == 0;
    for (int m = 0; m < M; m++) {
        for (int i = 0; i < rows; i++) {
            const uint8_t *wn = w + (size_t)i * w_row;
            float v = 0.0f;
            for (int c = 0; c < nc; c++) {
                int32_t dot[4] = {0, 0, 0, 0}; /* the chunk's quarters */
                for (int j = 0; j < QB; j++) {
                    const int k = c * QB + j;
                    const int q = bits != 8 ? packed_code(wn, c, j, bits, e2m1)
                                            : ((const int8_t *)wn)[k];
                    dot[j / 16] += q * xq[(size_t)m * K + k];
                }
                const float xdc = xd[(size_t)m * nc + c];
                for (int h = 0; h < units; h++) {
                    const int32_t unit = units == 4   ? dot[h]
                                         : units == 2 ? dot[2 * h] + dot[2 * h + 1]
                                                      : dot[0] + dot[1] + dot[2] + dot[3];
                    const int g = units > 1 ? units * c + h : gi[c];
                    const float f =
                        per_row ? xdc : xdc * block_scale(scale, offset, meta, gps, g, i);
                    v = fmaf((float)unit, f, v);
                }
            }
            const float row_scale = per_row ? block_scale(scale, offset, meta, gps, 0, i) : 1.0f;
            v = fmaf(v, row_scale, bias ? bias[n0 + i] : 0.0f);
            for (int g = 0; g < ng; g++)
                v = fmaf(block_offset(scale, offset, meta, bits, gps, g, i),
                         xsum[(size_t)m * ng + g], v);
            const size_t at = (size_t)m * N + n0 + i;
            if (y_bf16)
                ((uint16_t *)y)[at] = f32_to_bf16(v);
            else
                ((float *)y)[at] = v;
        }
    }
}
#endif

#include "qgemm_amx.c"

/* Rows of x from which AMX tiles (where the CPU has them) beat the row kernel below.
 * Linear by linear, SmolLM2's int4 g32 layers on the VNNI tile took 0.70x the AMX time
 * at 4 rows, 0.94x at 8, 1.13x at 10 and 1.43x at 16; but whole decode steps of the
 * model (BENCHMARKS.md, "Speculative decoding") ran 9 rows in 12.9 ms on VNNI against
 * 16.6 ms on AMX, and the two met only at 16. The two give the same bits, so the
 * crossing is a matter of speed alone. */
#define AMX_MIN_ROWS 16

/* 1 when calls of AMX_MIN_ROWS rows or more run on AMX tiles. */
int qgemv_amx(void) { return amx_ready(); }

/* The operands of a call once x is quantized (xq, xd, xsum: quantize_row's, per row). */
typedef struct {
    const int8_t *xq;
    const float *xd, *xsum;
    int M, K, nc, ng, units; /* units: a chunk's groups of 16 or 32 inputs, else 1 */
    const int *gi;
    const uint8_t *w;
    size_t w_row;
    int bits, e2m1, meta, gps, N; /* gps: META_K's groups a super-block */
    const void *scale, *offset;
    const float *bias;
    void *y;
    int y_bf16;
} Call;

#ifdef HAVE_TILE16
/* tile16 for one (bits, units): its own function, so that GCC allocates each
 * specialisation's registers on its own (the twelve inlined into one loop ran the int4
 * decode tile about 10% slower, measured build against build in one process). */
typedef void (*Tile16Fn)(const Call *a, const int32_t *xi, int n0, __m512i *wt);
#define TILE16_FN(B, H)                                                                       \
    static __attribute__((noinline)) void tile16_##B##_##H(const Call *a, const int32_t *xi,  \
                                                          int n0, __m512i *wt) {              \
        tile16(a->w, a->w_row, B, a->e2m1, H, a->scale, a->offset, a->meta, a->gps, a->ng,    \
               a->xq, a->xd, a->xsum, xi, a->M, a->K, a->gi, a->bias, n0, a->N, a->y,         \
               a->y_bf16, wt);                                                                \
    }
TILE16_FN(4, 1)
TILE16_FN(4, 2)
TILE16_FN(4, 4)
TILE16_FN(5, 1)
TILE16_FN(5, 2)
TILE16_FN(5, 4)
TILE16_FN(6, 1)
TILE16_FN(6, 2)
TILE16_FN(6, 4)
TILE16_FN(8, 1)
TILE16_FN(8, 2)
TILE16_FN(8, 4)
#undef TILE16_FN

static Tile16Fn tile16_for(int bits, int units) {
    static const Tile16Fn fns[4][3] = {
        {tile16_4_1, tile16_4_2, tile16_4_4},
        {tile16_5_1, tile16_5_2, tile16_5_4},
        {tile16_6_1, tile16_6_2, tile16_6_4},
        {tile16_8_1, tile16_8_2, tile16_8_4},
    };
    return fns[bits == 8 ? 3 : bits - 4][units == 4 ? 2 : units - 1];
}

/* Tiles of 16 rows of W, each thread with room for one: W is read from memory once, x
 * from cache once per tile. */
static int run_tiles(const Call *a) {
    const int nc = a->nc, ng = a->ng, nu = a->units * nc, per = a->K / nu;
    int rc = 0;
    /* int8: each row's sums of xq per unit (tile_pass' xi) */
    int32_t *xi = a->bits == 8 ? malloc(sizeof(int32_t) * (size_t)a->M * nu) : NULL;
    if (a->bits == 8 && !xi) return -1;
    for (size_t u = 0; xi && u < (size_t)a->M * nu; u++) {
        int32_t sum = 0;
        for (int j = 0; j < per; j++) sum += a->xq[u * per + j];
        xi[u] = sum;
    }
#pragma omp parallel reduction(| : rc)
    {
        /* one pass of x's rows transposes as it goes (tile16), more keep the tile */
        const int whole = a->M > QT_ROWS || a->bits == 5 || a->bits == 6; /* tile16's `fused` */
        __m512i *wt = whole ? aligned_alloc(64, (size_t)nc * 16 * 64) : NULL;
        const int ok = !whole || wt;
        if (!ok) rc = -1;
        const Tile16Fn tile = tile16_for(a->bits, a->units);
#pragma omp for schedule(static)
        for (int n0 = 0; n0 < a->N; n0 += 16)
            if (ok) tile(a, xi, n0, wt);
        free(wt);
    }
    free(xi);
    return rc;
}
#else
/* Rows of W in blocks of 8: the offset terms, scales and sums of 8 rows are then vector
 * operations, and the offsets of a block lie together (see the layout). A block's
 * weights stay in cache while every row of x passes over them, so W is read from memory
 * once however many rows x has. */
static int run_blocks(const Call *a) {
    const int ng = a->ng;
#pragma omp parallel for schedule(static)
    for (int n0 = 0; n0 < a->N; n0 += 8) {
        const int rows = a->N - n0 < 8 ? a->N - n0 : 8;
        const uint8_t *wb = a->w + n0 * a->w_row;
        /* the block's slices of the metadata, blocked by 8 rows */
        const int meta = a->meta;
        const void *sb = scale_block(a->scale, meta, ng, (size_t)n0 / FS);
        const void *ob = offset_block(a->offset, meta, ng, a->gps, (size_t)n0 / FS);
        /* Constant arguments: each case is its own specialised loop. */
#define BLOCK8(B, H, META)                                                                 \
    block8(wb, a->w_row, B, a->e2m1, H, sb, ng, ob, META, a->gps, a->xq, a->xd, a->xsum,  \
           a->M, a->K, a->gi, a->bias, rows, n0, a->N, a->y, a->y_bf16)
#define BY_META(B, H)                             \
    (meta == META_ZERO  ? BLOCK8(B, H, META_ZERO) \
     : meta == META_F16 ? BLOCK8(B, H, META_F16)  \
     : meta == META_K   ? BLOCK8(B, H, META_K)    \
                        : BLOCK8(B, H, META_F32))
        if (a->bits == 4)
            a->units == 4 ? BY_META(4, 4) : a->units == 2 ? BY_META(4, 2) : BY_META(4, 1);
        else if (a->bits == 5)
            a->units == 4 ? BY_META(5, 4) : a->units == 2 ? BY_META(5, 2) : BY_META(5, 1);
        else if (a->bits == 6)
            a->units == 4 ? BY_META(6, 4) : a->units == 2 ? BY_META(6, 2) : BY_META(6, 1);
        else
            a->units == 4 ? BY_META(8, 4) : a->units == 2 ? BY_META(8, 2) : BY_META(8, 1);
#undef BY_META
#undef BLOCK8
    }
    return 0;
}
#endif

/* Whether qgemv and qdequant take these shapes and forms. */
static int takes(int K, int bits, int group, int meta, int codebook) {
    return K % QB == 0 && K % group == 0 && (group == 16 || group == 32 || group % QB == 0) &&
           ((bits >= 4 && bits <= 6) || bits == 8) && meta >= META_F32 && meta <= META_K &&
           (meta != META_K || (K % K_SUPER == 0 && K_SUPER % group == 0)) &&
           (codebook == CODEBOOK_NONE || (codebook == CODEBOOK_E2M1 && bits == 4));
}

/* Returns 0, or -1 when the shapes are outside what this kernel takes. */
int qgemv(const void *x, int x_bf16, int M, int K, const int64_t *perm, const void *w, int bits,
          const void *scale, const void *offset, int group, int meta, int codebook, int N,
          const float *bias, void *y, int y_bf16) {
    if (M < 1 || !takes(K, bits, group, meta, codebook)) return -1;
    const int nc = K / QB, ng = K / group;
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
    /* rows apart: done serially, it took 10-15% of a call of 64 rows or more */
#pragma omp parallel for schedule(static) if (M >= 16)
    for (int m = 0; m < M; m++)
        quantize_row((const char *)x + m * x_row, x_bf16, perm, K, group, xq + (size_t)m * K,
                     xd + (size_t)m * nc, xsum + (size_t)m * ng);
    int rc;
    if (M >= AMX_MIN_ROWS && group >= 32 && amx_ready()) { /* its units are 32 or 64 */
        rc = qgemm_amx(xq, xd, xsum, M, K, w, bits, codebook == CODEBOOK_E2M1, scale, offset,
                       group, meta, N, bias, y, y_bf16);
    } else {
        const int units = group < QB ? QB / group : 1;
        const Call call = {.xq = xq, .xd = xd, .xsum = xsum, .M = M, .K = K, .nc = nc, .ng = ng,
                           .units = units, .gi = gi, .w = (const uint8_t *)w,
                           .w_row = (size_t)K * bits / 8, .bits = bits,
                           .e2m1 = codebook == CODEBOOK_E2M1, .meta = meta,
                           .gps = groups_per_super(meta, group), .N = N, .scale = scale,
                           .offset = offset, .bias = bias, .y = y, .y_bf16 = y_bf16};
#ifdef HAVE_TILE16
        rc = run_tiles(&call);
#else
        rc = run_blocks(&call);
#endif
    }
    free(xq);
    free(xd);
    return rc;
}

/* W (N, K) in fp32 or bf16 (out_bf16) from qgemv's operands (same layouts), written in
 * one pass: the dense path of calls with more rows than the kernel serves well
 * multiplies this copy (in torch, unpacking, widening, scaling and offsetting would
 * each be a pass over the matrix: about ten times the time). bf16 rounds as torch does
 * (nearest even). Returns 0, or -1 for shapes qgemv does not take. */
int qdequant(const void *w, int bits, const void *scale, const void *offset, int group,
             int meta, int codebook, int N, int K, void *out, int out_bf16) {
    if (!takes(K, bits, group, meta, codebook)) return -1;
    const int e2m1 = codebook == CODEBOOK_E2M1;
    const int ng = K / group, gps = groups_per_super(meta, group);
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        const uint8_t *wn = (const uint8_t *)w + (size_t)n * K * bits / 8;
        const void *sb = scale_block(scale, meta, ng, (size_t)n / FS);
        const void *ob = offset_block(offset, meta, ng, gps, (size_t)n / FS);
        float buf[16];
        for (int k0 = 0; k0 < K; k0 += 16) { /* 16 inputs share a group */
            const int g = k0 / group;
            const float s = block_scale(sb, ob, meta, gps, g, n % FS);
            const float o = block_offset(sb, ob, meta, bits, gps, g, n % FS);
            float *yk = out_bf16 ? buf : (float *)out + (size_t)n * K + k0;
            if (bits != 8) {
#pragma omp simd
                for (int j = 0; j < 16; j++)
                    yk[j] = s * (float)packed_code(wn, k0 / QB, k0 % QB + j, bits, e2m1) + o;
            } else {
                const int8_t *q = (const int8_t *)wn + k0;
#pragma omp simd
                for (int j = 0; j < 16; j++) yk[j] = s * (float)q[j] + o;
            }
            if (out_bf16) {
                uint16_t *yb = (uint16_t *)out + (size_t)n * K + k0;
#pragma omp simd
                for (int j = 0; j < 16; j++) yb[j] = f32_to_bf16(buf[j]);
            }
        }
    }
    return 0;
}
