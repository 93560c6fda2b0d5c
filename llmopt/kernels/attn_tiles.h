/* Attention of a block of query rows over keys and values read in place from a paged
 * cache, as small matrix products on AVX-512 register tiles (fp32 throughout).
 *
 * Rows are (query token, query head) pairs that read one KV head: in decode, the G
 * heads of every sequence of a group sharing a cached prefix; in prefill, the G heads of
 * a run of a chunk's tokens. Keys come in chunks of TILE_KEYS: a chunk is transposed
 * once into (D, TILE_KEYS) for all rows, scores S = Q K^T and the running sums
 * acc = P V go through TILE_ROWS-row tiles (16 accumulators; one broadcast and four
 * FMAs per load), with an online softmax per row across chunks (flash attention's
 * recurrence). Causality is a per-row key limit. Needs D % 64 == 0.
 *
 * Keys and values are read in place in the cache's types (kv_types.h): a key row is
 * widened into its column of the transposed chunk, scale applied; value rows are widened
 * in registers, their scale on the loaded vector.
 *
 * Shapes: the layer's cache kv (S, KV, D); slots int64 cache slots of the chunk's keys. */
#ifndef LLMOPT_ATTN_TILES_H
#define LLMOPT_ATTN_TILES_H
#ifdef __AVX512F__
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "exp_approx.h"
#include "kv_types.h"

#define TILE_ROWS 4
#define TILE_KEYS 64

/* One thread's rows in flight. rows: allocated, a multiple of TILE_ROWS.
 * q, acc: (rows, D); s: (rows, TILE_KEYS); kt: (D, TILE_KEYS); m, l: (rows,). */
typedef struct {
    float *q, *acc, *s, *kt, *m, *l;
} Tiles;

static inline int64_t tile_rows(int64_t used) {
    return (used + TILE_ROWS - 1) / TILE_ROWS * TILE_ROWS;
}

static Tiles tiles_alloc(int64_t max_rows, int D) {
    const size_t rows = (size_t)tile_rows(max_rows);
    Tiles t;
    t.q = malloc(sizeof(float) * (rows * (2 * (size_t)D + TILE_KEYS + 2) +
                                  (size_t)D * TILE_KEYS));
    t.acc = t.q + rows * D;
    t.s = t.acc + rows * D;
    t.m = t.s + rows * TILE_KEYS;
    t.l = t.m + rows;
    t.kt = t.l + rows;
    return t;
}

/* Start rows 0 .. used-1 (their queries already in t->q): nothing attended yet; the
 * padding rows up to a whole tile get zero queries. */
static void tiles_reset(const Tiles *t, int64_t used, int D) {
    const int64_t rows = tile_rows(used);
    memset(t->q + used * D, 0, sizeof(float) * (size_t)(rows - used) * D);
    memset(t->acc, 0, sizeof(float) * (size_t)rows * D);
    for (int64_t x = 0; x < rows; x++) t->m[x] = -INFINITY, t->l[x] = 0.0f;
}

/* a[0..3] += x * (b0, b1, b2, b3): one row of a tile, 64 lanes. */
static inline void tile_row_fma(__m512 a[4], __m512 x, __m512 b0, __m512 b1, __m512 b2,
                                __m512 b3) {
    a[0] = _mm512_fmadd_ps(x, b0, a[0]);
    a[1] = _mm512_fmadd_ps(x, b1, a[1]);
    a[2] = _mm512_fmadd_ps(x, b2, a[2]);
    a[3] = _mm512_fmadd_ps(x, b3, a[3]);
}

/* s[r][j] = q[r] . kt[:, j] for TILE_ROWS rows and the chunk's TILE_KEYS keys. */
static inline void tile_scores(const float *restrict q, const float *restrict kt, int D,
                               float *restrict s) {
    __m512 a[TILE_ROWS][4];
    for (int r = 0; r < TILE_ROWS; r++)
        for (int c = 0; c < 4; c++) a[r][c] = _mm512_setzero_ps();
    for (int d = 0; d < D; d++) {
        const float *kd = kt + d * TILE_KEYS;
        const __m512 k0 = _mm512_loadu_ps(kd), k1 = _mm512_loadu_ps(kd + 16),
                     k2 = _mm512_loadu_ps(kd + 32), k3 = _mm512_loadu_ps(kd + 48);
        for (int r = 0; r < TILE_ROWS; r++)
            tile_row_fma(a[r], _mm512_set1_ps(q[r * D + d]), k0, k1, k2, k3);
    }
    for (int r = 0; r < TILE_ROWS; r++)
        for (int c = 0; c < 4; c++) _mm512_storeu_ps(s + r * TILE_KEYS + 16 * c, a[r][c]);
}

/* acc[r][d0 .. d0+63] += sum_j p[r][j] v[j][d0 ..] for TILE_ROWS rows, keys j < n;
 * v of type t (a constant where inlined: KV_DISPATCH). */
static inline __attribute__((always_inline)) void tile_values(
    const float *restrict p, const void *restrict v, const uint16_t *restrict vs,
    const int64_t *restrict sl, int n, int KV, int kvh, int D, int d0, float *restrict acc,
    int t) {
    __m512 a[TILE_ROWS][4];
    for (int r = 0; r < TILE_ROWS; r++)
        for (int c = 0; c < 4; c++) a[r][c] = _mm512_loadu_ps(acc + r * D + d0 + 16 * c);
    for (int j = 0; j < n; j++) {
        const int64_t row = sl[j] * KV + kvh;
        const void *vj = kv_row(v, t, row, D);
        __m512 v0 = kv_load16(vj, t, d0), v1 = kv_load16(vj, t, d0 + 16),
               v2 = kv_load16(vj, t, d0 + 32), v3 = kv_load16(vj, t, d0 + 48);
        if (kv_scaled(t)) {
            const __m512 s = _mm512_set1_ps(kv_scale(vs, t, row));
            v0 = _mm512_mul_ps(v0, s), v1 = _mm512_mul_ps(v1, s);
            v2 = _mm512_mul_ps(v2, s), v3 = _mm512_mul_ps(v3, s);
        }
        for (int r = 0; r < TILE_ROWS; r++)
            tile_row_fma(a[r], _mm512_set1_ps(p[r * TILE_KEYS + j]), v0, v1, v2, v3);
    }
    for (int r = 0; r < TILE_ROWS; r++)
        for (int c = 0; c < 4; c++) _mm512_storeu_ps(acc + r * D + d0 + 16 * c, a[r][c]);
}

/* kt[:, j] = key row `row` (D codes of type t), widened and scaled, for j < n. */
static inline __attribute__((always_inline)) void tile_key(float *restrict kt, int j,
                                                           const void *k, const uint16_t *ks,
                                                           int64_t row, int D, int t) {
    const void *kj = kv_row(k, t, row, D);
    const __m512 s = _mm512_set1_ps(kv_scale(ks, t, row));
    float w[16];
    for (int d = 0; d < D; d += 16) {
        _mm512_storeu_ps(w, _mm512_mul_ps(kv_load16(kj, t, d), s));
        for (int i = 0; i < 16; i++) kt[(d + i) * TILE_KEYS + j] = w[i];
    }
}

/* Lanes of the 16-key group c that are among the first `visible` keys of a chunk. */
static inline __mmask16 tile_lanes(int64_t visible, int c) {
    const int64_t lanes = visible - 16 * c < 0 ? 0 : (visible - 16 * c > 16 ? 16 : visible - 16 * c);
    return (__mmask16)((1u << lanes) - 1u);
}

/* Attend rows 0 .. used-1 to one chunk of n <= TILE_KEYS keys, at key positions
 * c0 .. c0+n-1 with cache slots sl[0 .. n-1], of KV head kvh. Row x sees the keys
 * before position limit0 + x / G (causal: its token's position + 1); INT64_MAX: all. */
static void tiles_chunk(const Tiles *t, int64_t used, int G, int64_t limit0, int64_t c0,
                        const KVLayer *kv, const int64_t *restrict sl, int n, int KV, int kvh,
                        int D) {
    for (int j = 0; j < TILE_KEYS; j++) {
        if (j < n)
            KV_DISPATCH(kv->kt, tile_key, t->kt, j, kv->k, kv->ks, sl[j] * KV + kvh, D);
        else
            for (int d = 0; d < D; d++) t->kt[d * TILE_KEYS + j] = 0.0f;
    }
    const int64_t rows = tile_rows(used);
    for (int64_t r0 = 0; r0 < rows; r0 += TILE_ROWS)
        tile_scores(t->q + r0 * D, t->kt, D, t->s + r0 * TILE_KEYS);
    /* Online softmax: each row's sums rescaled to its new maximum, exps in place (keys
     * the row does not see: exps of 0). */
    for (int64_t x = 0; x < used; x++) {
        const int64_t limit = limit0 == INT64_MAX ? INT64_MAX : limit0 + x / G;
        const int64_t visible = limit - c0 < n ? limit - c0 : n;
        float *sx = t->s + x * TILE_KEYS;
        if (visible <= 0) {
            memset(sx, 0, sizeof(float) * TILE_KEYS);
            continue;
        }
        __mmask16 lanes[4];
        __m512 sc[4], top = _mm512_set1_ps(t->m[x]), total = _mm512_setzero_ps();
        for (int c = 0; c < 4; c++) {
            lanes[c] = tile_lanes(visible, c);
            sc[c] = _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), lanes[c], sx + 16 * c);
            top = _mm512_max_ps(top, sc[c]);
        }
        const float mx = _mm512_reduce_max_ps(top);
        for (int c = 0; c < 4; c++) {
            const __m512 e = _mm512_maskz_mov_ps(
                lanes[c], exp512_nonpositive(_mm512_sub_ps(sc[c], _mm512_set1_ps(mx))));
            _mm512_storeu_ps(sx + 16 * c, e);
            total = _mm512_add_ps(total, e);
        }
        const float alpha = exp_nonpositive(t->m[x] - mx); /* 0 for the row's first keys */
        t->m[x] = mx;
        t->l[x] = t->l[x] * alpha + _mm512_reduce_add_ps(total);
        float *ax = t->acc + x * D;
#pragma omp simd
        for (int d = 0; d < D; d++) ax[d] *= alpha;
    }
    for (int64_t r0 = 0; r0 < used; r0 += TILE_ROWS)
        for (int d0 = 0; d0 < D; d0 += 64)
            KV_DISPATCH(kv->vt, tile_values, t->s + r0 * TILE_KEYS, kv->v, kv->vs, sl, n, KV,
                        kvh, D, d0, t->acc + r0 * D);
}

/* Attend rows 0 .. used-1 to keys j0 .. j1-1 (slots sl[j0 ..]), chunk by chunk. */
static void tiles_attend(const Tiles *t, int64_t used, int G, int64_t limit0, int64_t j0,
                         int64_t j1, const KVLayer *kv, const int64_t *sl, int KV, int kvh,
                         int D) {
    for (int64_t c0 = j0; c0 < j1; c0 += TILE_KEYS) {
        const int n = j1 - c0 < TILE_KEYS ? (int)(j1 - c0) : TILE_KEYS;
        tiles_chunk(t, used, G, limit0, c0, kv, sl + c0, n, KV, kvh, D);
    }
}
#endif
#endif
