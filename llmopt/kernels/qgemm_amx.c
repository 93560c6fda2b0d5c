/* qgemv's arithmetic on AMX tiles, for calls with more than a few rows of x (batched
 * decode steps, prefill chunks) on CPUs with AMX-INT8 (Sapphire Rapids and later).
 * Included by qgemv.c, which quantizes x (quantize_row) and calls qgemm_amx.
 *
 * Why: the AVX2 row kernel spends about ten instructions per 64 multiply-adds (the
 * unpacking, the int16/int32 widening and a float scale per 32 weights), so 16 rows of
 * x cost 16 passes of that arithmetic over W. One AMX tile product multiplies 16 rows
 * of W by 16 rows of x over 32 inputs (8,192 multiply-adds) in one instruction, and
 * the per-group float scaling is then done once per tile.
 *
 * Orientation: the tiles compute C^T = W x^T, C[n][m] = sum_k W[n, k] x[m, k], so that
 * W's rows load as they are stored (A operand: 16 rows x 32 codes, int4 unpacked to
 * one byte each) and x, quantized per call anyway, is laid out in the B operand's
 * VNNI order (8 rows of 4 inputs x 16 rows of x). A 16 x 16 tile of C per 32 inputs:
 *   y[m, n] = sum_u float(C_u[n][m]) * (xd[m, c(u)] * scale[n, g(u)])
 *           + sum_g offset[n, g] * xsum[m, g] + bias[n]
 * over units u (32-input halves for group 32, else 64-input chunks), in qgemv's order of
 * the float operations too ("The arithmetic every block below shares" in qgemv.c), so
 * that a row of x gets the same bits here as from the row kernels, whatever else shares
 * the call. Accumulators: acc[n] holds y[., n0 + n] for the 16 rows of the x tile, one
 * zmm per row of W.
 */
#if (defined(__AMX_INT8__) && defined(__AMX_TILE__) || defined(LLMOPT_AMX_EMULATED)) && \
    defined(__AVX512F__)
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#ifdef LLMOPT_AMX_EMULATED
#include "amx_emulated.h"
#endif

#define AMX_T 16 /* rows of W and of x per tile */

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} TileConfig;

/* Tiles: 0, 1 accumulators (16 x 16 int32); 2, 3 the two 32-input halves of a 64-input
 * chunk of W (16 rows x 32 bytes); 4, 5 the same halves of x (8 x 64 bytes). */
static void amx_configure(void) {
    TileConfig cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int t = 0; t < 2; t++) cfg.rows[t] = AMX_T, cfg.colsb[t] = 64;
    for (int t = 2; t < 4; t++) cfg.rows[t] = AMX_T, cfg.colsb[t] = 32;
    for (int t = 4; t < 6; t++) cfg.rows[t] = 8, cfg.colsb[t] = 64;
    _tile_loadconfig(&cfg);
}

/* Linux hands a process the AMX register state only when asked (arch_prctl
 * ARCH_REQ_XCOMP_PERM for XTILEDATA); a refusal (an old kernel, a hypervisor that hides
 * it) leaves the AVX row kernel in charge. Asked once. */
static int amx_ready(void) {
#ifdef LLMOPT_AMX_EMULATED
    return 1;
#endif
    static int state = -1;
    if (state < 0) state = syscall(SYS_arch_prctl, 0x1023 /* REQ_XCOMP_PERM */, 18) == 0;
    return state;
}

/* One tile product into C from W tile A and x tile B: 4- to 6-bit codes are unsigned (times
 * signed x), int8 holds q - 128 (signed times signed). Tile numbers are immediates,
 * hence a macro. */
#define TDP(bits, C, A, B)         \
    do {                           \
        if ((bits) != 8)           \
            _tile_dpbusd(C, A, B); \
        else                       \
            _tile_dpbssd(C, A, B); \
    } while (0)

/* 16 rows of W from n0 (`rows` real, the rest zero), chunk c, as two 16 x 32 byte
 * tiles: a[0] inputs 64c .. 64c+31, a[1] the next 32. */
static void load_w_chunk(const uint8_t *w, size_t w_row, int bits, int e2m1, int rows, int c,
                         uint8_t a[2][AMX_T][32]) {
    for (int n = 0; n < AMX_T; n++) {
        if (n >= rows) {
            memset(a[0][n], 0, 32);
            memset(a[1][n], 0, 32);
            continue;
        }
        const uint8_t *src = w + (size_t)n * w_row + (size_t)c * QB * bits / 8;
        if (bits != 8) { /* byte j: input j low, input j + 32 high */
            const __m256i v = _mm256_loadu_si256((const __m256i *)src);
            const __m256i low = _mm256_set1_epi8(0x0f);
            __m256i lo = _mm256_and_si256(v, low);
            __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
            if (e2m1) { /* nibbles to codes (qgemv.c's E2M1_CODES) */
                const __m256i t =
                    _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)E2M1_CODES));
                lo = _mm256_shuffle_epi8(t, lo);
                hi = _mm256_shuffle_epi8(t, hi);
            }
            add_planes(&lo, &hi, src, bits); /* 5 and 6 bits: the higher bits' planes */
            _mm256_storeu_si256((__m256i *)a[0][n], lo);
            _mm256_storeu_si256((__m256i *)a[1][n], hi);
        } else {
            memcpy(a[0][n], src, 32);
            memcpy(a[1][n], src + 32, 32);
        }
    }
}

/* The (ng, 16) fp32 copy dst[g * 16 + n] of rows n0 .. n0 + 15 of the blocked scales,
 * or with `offsets` of the offsets in any form (offset8), zeros past the `rows` real
 * rows (a block of 8 past N is not stored). Vector conversions: scalar fp16 ones here
 * cost more than the tiles' arithmetic. */
static void blocked16(float *dst, const void *scale, const void *offset, int meta, int bits,
                      int gps, int offsets, int n0, int ng, int rows) {
    for (int h = 0; h < 2; h++) {
        const size_t n8 = (size_t)n0 / FS + h;
        const void *sb = scale_block(scale, meta, ng, n8);
        const void *ob = offset_block(offset, meta, ng, gps, n8);
        if (FS * h < rows) {
            expand_meta(dst + FS * h, AMX_T, sb, ob, meta, bits, gps, ng, offsets);
        } else {
            for (int g = 0; g < ng; g++)
                _mm256_storeu_ps(dst + g * AMX_T + FS * h, _mm256_setzero_ps());
        }
    }
}

/* acc[n] = fma(float(C[n]), xd * scale[n, g], acc[n]) for one unit's tile products C:
 * qgemv's shared arithmetic (qgemv.c), lanes the tile's rows of x. sg: the unit's
 * scales (16,), NULL where one scale covers each row (applied in the epilogue). */
static inline __attribute__((always_inline)) void fold_unit(__m512 acc[AMX_T],
                                                            const int32_t c[AMX_T][AMX_T],
                                                            const float *sg, __m512 xdv) {
    for (int n = 0; n < AMX_T; n++) {
        const __m512 f = sg ? _mm512_mul_ps(xdv, _mm512_set1_ps(sg[n])) : xdv;
        acc[n] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_loadu_si512(c[n])), f, acc[n]);
    }
}

/* y (M, N) = x W^T + b with x already quantized: xq (M, K), xd (M, K / 64), xsum
 * (M, K / group), as quantize_row writes them. Operands as qgemv's. Returns 0, or -1
 * when out of memory. */
static int qgemm_amx(const int8_t *xq, const float *xd, const float *xsum, int M, int K,
                     const uint8_t *w, int bits, int e2m1, const void *scale,
                     const void *offset, int group, int meta, int N, const float *bias, void *y,
                     int y_bf16) {
    const int nc = K / QB, ng = K / group, halves = group == 32, nt = (M + AMX_T - 1) / AMX_T;
    const int per_row = !halves && ng == 1; /* one scale per row of W, as block8's per_row */
    const int gps = groups_per_super(meta, group);
    const int ns = K / 32; /* 32-input halves */
    /* x in the B operand's order, per tile of 16 rows and half: xv[t][s] is 8 rows of
     * 16 dwords, dword (kk, m) = inputs 32 s + 4 kk .. + 3 of row 16 t + m (zero rows
     * past M); and per tile the row factors transposed: xdt[t][c][m], xst[t][g][m]. */
    int32_t *xv = calloc((size_t)nt * ns * 8 * AMX_T, sizeof(int32_t));
    float *xdt = calloc((size_t)nt * (nc + ng) * AMX_T, sizeof(float));
    if (!xv || !xdt) {
        free(xv);
        free(xdt);
        return -1;
    }
    float *xst = xdt + (size_t)nt * nc * AMX_T;
    for (int m = 0; m < M; m++) {
        const int t = m / AMX_T, r = m % AMX_T;
        const int32_t *row = (const int32_t *)(xq + (size_t)m * K);
        for (int s = 0; s < ns; s++)
            for (int kk = 0; kk < 8; kk++)
                xv[(((size_t)t * ns + s) * 8 + kk) * AMX_T + r] = row[s * 8 + kk];
        for (int c = 0; c < nc; c++) xdt[((size_t)t * nc + c) * AMX_T + r] = xd[(size_t)m * nc + c];
        for (int g = 0; g < ng; g++)
            xst[((size_t)t * ng + g) * AMX_T + r] = xsum[(size_t)m * ng + g];
    }
    const size_t w_row = (size_t)K * bits / 8;
    const int nb = (N + AMX_T - 1) / AMX_T;
    /* With several tiles of x, a block's W chunks are unpacked once into `unpacked`
     * (nc chunks of 2 x 16 x 32 bytes: 24 KB at K = 1,536, in L1/L2) and read from there
     * by every tile, instead of unpacked again per tile (at 32 rows that was half of the
     * unpacking). The tile products and the float arithmetic are the same, in the same
     * order: only where A comes from changes. */
    const int shared_w = nt > 1;
#pragma omp parallel
    {
        amx_configure();
        /* The block's scales sc[g][n] and offsets of[g][n] in fp32, once per block */
        float sc[ng * AMX_T], of[ng * AMX_T];
        uint8_t(*unpacked)[2][AMX_T][32] =
            shared_w ? aligned_alloc(64, sizeof(uint8_t[2][AMX_T][32]) * (size_t)nc) : NULL;
#pragma omp for schedule(static)
        for (int b = 0; b < nb; b++) {
            const int n0 = b * AMX_T, rows = N - n0 < AMX_T ? N - n0 : AMX_T;
            blocked16(sc, scale, offset, meta, bits, gps, 0, n0, ng, rows);
            blocked16(of, scale, offset, meta, bits, gps, 1, n0, ng, rows);
            const uint8_t *wb = w + (size_t)n0 * w_row;
            for (int c = 0; unpacked && c < nc; c++)
                load_w_chunk(wb, w_row, bits, e2m1, rows, c, unpacked[c]);
            for (int t = 0; t < nt; t++) {
                __m512 acc[AMX_T];
                for (int n = 0; n < AMX_T; n++) acc[n] = _mm512_setzero_ps();
                for (int c = 0; c < nc; c++) {
                    uint8_t own[2][AMX_T][32];
                    int32_t c0[AMX_T][AMX_T], c1[AMX_T][AMX_T];
                    uint8_t(*a)[AMX_T][32] = unpacked ? unpacked[c] : own;
                    if (!unpacked) load_w_chunk(wb, w_row, bits, e2m1, rows, c, own);
                    const int32_t *xb = xv + ((size_t)t * ns + 2 * c) * 8 * AMX_T;
                    _tile_zero(0);
                    _tile_loadd(2, a[0], 32);
                    _tile_loadd(3, a[1], 32);
                    _tile_loadd(4, xb, 64);
                    _tile_loadd(5, xb + 8 * AMX_T, 64);
                    TDP(bits, 0, 2, 4);
                    if (halves) { /* each half has scales of its own */
                        _tile_zero(1);
                        TDP(bits, 1, 3, 5);
                    } else {
                        TDP(bits, 0, 3, 5);
                    }
                    _tile_stored(0, c0, 64);
                    if (halves) _tile_stored(1, c1, 64);
                    const __m512 xdv = _mm512_loadu_ps(xdt + ((size_t)t * nc + c) * AMX_T);
                    const int g0 = halves ? 2 * c : c * QB / group;
                    fold_unit(acc, c0, per_row ? NULL : sc + g0 * AMX_T, xdv);
                    if (halves) fold_unit(acc, c1, sc + (g0 + 1) * AMX_T, xdv);
                }
                /* The epilogue, as store8's: v * row scale + bias, then the offsets. */
                for (int n = 0; n < AMX_T; n++) {
                    const float b = n < rows && bias ? bias[n0 + n] : 0.0f;
                    acc[n] = _mm512_fmadd_ps(acc[n], _mm512_set1_ps(per_row ? sc[n] : 1.0f),
                                             _mm512_set1_ps(b));
                }
                for (int g = 0; g < ng; g++) {
                    const __m512 xs = _mm512_loadu_ps(xst + ((size_t)t * ng + g) * AMX_T);
                    for (int n = 0; n < AMX_T; n++)
                        acc[n] = _mm512_fmadd_ps(_mm512_set1_ps(of[g * AMX_T + n]), xs, acc[n]);
                }
                /* acc[n][m] -> y[16 t + m, n0 + n]: through a 16 x 16 transpose in memory */
                float tr[AMX_T][AMX_T];
                for (int n = 0; n < AMX_T; n++) _mm512_storeu_ps(tr[n], acc[n]);
                const int mrows = M - t * AMX_T < AMX_T ? M - t * AMX_T : AMX_T;
                for (int r = 0; r < mrows; r++) {
                    const size_t at = (size_t)(t * AMX_T + r) * N + n0;
                    for (int n = 0; n < rows; n++) {
                        const float v = tr[n][r];
                        if (y_bf16)
                            ((uint16_t *)y)[at + n] = f32_to_bf16(v);
                        else
                            ((float *)y)[at + n] = v;
                    }
                }
            }
        }
        _tile_release();
        free(unpacked);
    }
    free(xv);
    free(xdt);
    return 0;
}
#else
static int amx_ready(void) { return 0; }
static int qgemm_amx(const int8_t *xq, const float *xd, const float *xsum, int M, int K,
                     const uint8_t *w, int bits, int e2m1, const void *scale,
                     const void *offset, int group, int meta, int N, const float *bias, void *y,
                     int y_bf16) {
    return -1;
}
#endif
