/* Decode attention over a paged KV cache, reading keys and values in place.
 *
 * One query token per sequence. For sequence b, its visible keys are the cache slots
 * slots[b, 0 .. lens[b]-1] (any order of blocks). A torch version has to gather those
 * slots into a new tensor first, copying every sequence's whole KV each step; this
 * reads each key and value once, where it lies.
 *
 * Shapes (contiguous): q (B, H, D) fp32; kv the layer's cache, k and v (S, KV, D) in
 * their types (kv_types.h), read in place, widened in registers; slots (B, L) int64;
 * lens (B,) int64; out (B, H, D) fp32. Query head h reads KV head h / (H / KV).
 *
 * Work item: a range of keys of one KV head, for one sequence or for every sequence
 * of a group that shares those keys (a cached prefix: see "Shared prefixes" below),
 * with each sequence's G = H / KV query heads, so each key and value is read once for
 * all heads that share it (grouped-query attention). Each range gives its own maximum,
 * sum and weighted values, merged at the end (split-K, as flash-decoding does on GPUs).
 * Per query head, scores (dot products vectorised with omp simd: without it the
 * compiler keeps the float sum in order, one FMA at a time), then exp; then one pass
 * over the values for all G heads (with AVX-512, the heads of a group together: see
 * attend_range_groups). The caller guarantees G * D <= MAX_GD.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <omp.h>

#include "dtype.h"

#include "exp_approx.h"
#include "kv_types.h"

/* The AVX-512 paths (head groups, below); a build for testing
 * the AVX2 ones turns them off (NativeCpuAttention.load(avx2=True)). */
#if defined(__AVX512F__) && !defined(LLMOPT_ATTN_AVX2)
#define ATTN_AVX512 1
#endif

/* The codes and scales of the 8 keys at slots sl[0 .. 7], KV head kvh. */
static inline __attribute__((always_inline)) void key_rows8(const void *k, const uint16_t *ks,
                                                            int t, const int64_t *sl, int KV,
                                                            int kvh, int D, const void *kp[8],
                                                            float sc[8]) {
    for (int i = 0; i < 8; i++) {
        const int64_t row = sl[i] * KV + kvh;
        kp[i] = kv_row(k, t, row, D);
        sc[i] = kv_scale(ks, t, row);
    }
}

/* q . key row `row` (D codes of type t), scaled: one key alone, for the keys left over
 * after the blocks of 8. */
static inline __attribute__((always_inline)) float key_dot(const float *restrict q,
                                                           const void *restrict k,
                                                           const uint16_t *restrict ks, int t,
                                                           int64_t row, int D) {
    const void *kj = kv_row(k, t, row, D);
    float x = 0.0f;
#pragma omp simd reduction(+ : x)
    for (int d = 0; d < D; d++) x += q[d] * kv_load1(kj, t, d);
    return x * kv_scale(ks, t, row);
}

/* s[j] = exp(s[j] - m) for the keys j0 .. j1-1 of one head, and its record's max and
 * sum of exps: rec[0] = m, rec[1] = the sum. */
static inline void exp_record(float *restrict s, int64_t j0, int64_t j1, float m,
                              float *restrict rec) {
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = j0; j < j1; j++) {
        s[j] = exp_nonpositive(s[j] - m);
        sum += s[j];
    }
    rec[0] = m;
    rec[1] = sum;
}

/* q . (codes of key j) for the keys j0 .. j1-1 of KV head kvh, scaled: s[j]; and
 * their maximum. Keys of type t (a constant where inlined: KV_DISPATCH). */
static inline __attribute__((always_inline)) float key_scores(
    const float *restrict q, const void *restrict k, const uint16_t *restrict ks,
    const int64_t *restrict sl, int64_t j0, int64_t j1, int KV, int kvh, int D,
    float *restrict s, int t) {
    float mx = -INFINITY;
    int64_t j = j0;
#ifdef __AVX2__
    if (D % 8 == 0) {
        /* 8 keys at once: eight independent FMA chains, then one transpose-and-add. One
         * key at a time, the dot product would be a single chain of D / 8 dependent FMAs
         * and a horizontal sum per key, latency-bound. */
        __m256 vmx = _mm256_set1_ps(-INFINITY);
        for (; j + 8 <= j1; j += 8) {
            const void *kp[8];
            float sc[8];
            key_rows8(k, ks, t, sl + j, KV, kvh, D, kp, sc);
            __m256 a[8];
            for (int i = 0; i < 8; i++) a[i] = _mm256_setzero_ps();
            for (int d = 0; d < D; d += 8) {
                const __m256 qv = _mm256_loadu_ps(q + d);
                for (int i = 0; i < 8; i++) a[i] = _mm256_fmadd_ps(qv, kv_load8(kp[i], t, d), a[i]);
            }
            __m256 s8 = sum8(a);
            if (kv_scaled(t)) s8 = _mm256_mul_ps(s8, _mm256_loadu_ps(sc));
            _mm256_storeu_ps(s + j, s8);
            vmx = _mm256_max_ps(vmx, s8);
        }
        float m8[8];
        _mm256_storeu_ps(m8, vmx);
        for (int i = 0; i < 8; i++) mx = m8[i] > mx ? m8[i] : mx;
    }
#endif
    for (; j < j1; j++) {
        s[j] = key_dot(q, k, ks, t, sl[j] * KV + kvh, D);
        mx = s[j] > mx ? s[j] : mx;
    }
    return mx;
}

#ifdef __AVX2__
/* acc (D8 * 8 floats) = sum_j p[j] * v[slot j] for one head: the accumulator stays in
 * registers across keys (D8 constant). Keys outer and heads inner would keep all
 * heads' accumulators in memory, a load and a store per FMA. */
static inline __attribute__((always_inline)) void weighted_values(
    float *restrict acc, const float *restrict p, const void *restrict v,
    const uint16_t *restrict vs, const int64_t *restrict sl, int64_t j0, int64_t j1, int KV,
    int kvh, int D8, int t) {
    __m256 a[16];
    for (int i = 0; i < D8; i++) a[i] = _mm256_setzero_ps();
    for (int64_t j = j0; j < j1; j++) {
        const int64_t row = sl[j] * KV + kvh;
        const void *vj = kv_row(v, t, row, D8 * 8);
        const __m256 pj = _mm256_set1_ps(kv_scaled(t) ? p[j] * kv_scale(vs, t, row) : p[j]);
        for (int i = 0; i < D8; i++) a[i] = _mm256_fmadd_ps(pj, kv_load8(vj, t, 8 * i), a[i]);
    }
    for (int i = 0; i < D8; i++) _mm256_storeu_ps(acc + 8 * i, a[i]);
}
#endif

/* rp[g] (records of D + 2) gets sum_j p_g[j] v[slot j] for the G heads, from offset 2;
 * p: (G, L) exps. Values of type t (a constant where inlined). */
static inline __attribute__((always_inline)) void head_values(
    const float *restrict p, const void *restrict v, const uint16_t *restrict vs,
    const int64_t *restrict sl, int64_t j0, int64_t j1, int L, int G, int KV, int kvh, int D,
    float *restrict rp, int t) {
    const size_t rec = (size_t)D + 2;
#ifdef __AVX2__
    if (D == 64 || D == 128) {
        for (int g = 0; g < G; g++)
            weighted_values(rp + g * rec + 2, p + (int64_t)g * L, v, vs, sl, j0, j1, KV, kvh,
                            D / 8, t);
        return;
    }
#endif
    for (int g = 0; g < G; g++)
        for (int d = 0; d < D; d++) rp[g * rec + 2 + d] = 0.0f;
    for (int64_t j = j0; j < j1; j++) {
        const int64_t row = sl[j] * KV + kvh;
        const void *vj = kv_row(v, t, row, D);
        const float sc = kv_scale(vs, t, row);
        for (int g = 0; g < G; g++) {
            const float pj = p[(int64_t)g * L + j] * sc;
            float *restrict a = rp + g * rec + 2;
#pragma omp simd
            for (int d = 0; d < D; d++) a[d] += pj * kv_load1(vj, t, d);
        }
    }
}

#ifdef ATTN_AVX512
/* With AVX-512 and D of 64 or 128, the heads of a KV head's group are attended together:
 * each key or value row is loaded and widened once for up to GB heads, where the loops
 * above take it once per head (for int8 or fp8 rows, the widening costs more than the
 * FMAs it feeds). */
#define GB_KEYS 3 /* heads per pass over the keys: 3 x 8 accumulators, 3 queries, a key */

/* s[g * L + j] = q_g . key j (scaled) for the gb heads q (gb rows of D) and the keys
 * j0 .. j1-1, mx[g] their maxima; 8 keys at a time, a 16-lane accumulator per (head,
 * key), folded to 8 lanes and transpose-added (sum8). gb and t constants once inlined. */
static inline __attribute__((always_inline)) void group_scores(
    const float *restrict q, int gb, const void *restrict k, const uint16_t *restrict ks,
    const int64_t *restrict sl, int64_t j0, int64_t j1, int KV, int kvh, int D, int L,
    float *restrict s, float *restrict mx, int t) {
    __m256 vmx[GB_KEYS];
    for (int g = 0; g < gb; g++) vmx[g] = _mm256_set1_ps(-INFINITY);
    int64_t j = j0;
    for (; j + 8 <= j1; j += 8) {
        const void *kp[8];
        float sc[8];
        key_rows8(k, ks, t, sl + j, KV, kvh, D, kp, sc);
        __m512 a[GB_KEYS][8];
        for (int g = 0; g < gb; g++)
            for (int i = 0; i < 8; i++) a[g][i] = _mm512_setzero_ps();
        for (int d = 0; d < D; d += 16) {
            __m512 qv[GB_KEYS];
            for (int g = 0; g < gb; g++) qv[g] = _mm512_loadu_ps(q + g * D + d);
            for (int i = 0; i < 8; i++) {
                const __m512 kv = kv_load16(kp[i], t, d);
                for (int g = 0; g < gb; g++) a[g][i] = _mm512_fmadd_ps(qv[g], kv, a[g][i]);
            }
        }
        for (int g = 0; g < gb; g++) {
            __m256 h[8];
            for (int i = 0; i < 8; i++)
                h[i] = _mm256_add_ps(_mm512_castps512_ps256(a[g][i]),
                                     _mm512_extractf32x8_ps(a[g][i], 1));
            __m256 s8 = sum8(h);
            if (kv_scaled(t)) s8 = _mm256_mul_ps(s8, _mm256_loadu_ps(sc));
            _mm256_storeu_ps(s + (int64_t)g * L + j, s8);
            vmx[g] = _mm256_max_ps(vmx[g], s8);
        }
    }
    for (int g = 0; g < gb; g++) {
        float m8[8];
        _mm256_storeu_ps(m8, vmx[g]);
        float m = -INFINITY;
        for (int i = 0; i < 8; i++) m = m8[i] > m ? m8[i] : m;
        for (int64_t x = j; x < j1; x++) { /* the last keys, one at a time */
            const float dot = key_dot(q + g * D, k, ks, t, sl[x] * KV + kvh, D);
            s[(int64_t)g * L + x] = dot;
            m = dot > m ? dot : m;
        }
        mx[g] = m;
    }
}

/* rp[g] values (offset 2 of records of D + 2) = sum_j p[g * L + j] v[slot j] for the gb
 * heads, D16 = D / 16 zmm per head held across the keys; each value row loaded once. */
static inline __attribute__((always_inline)) void group_values(
    const float *restrict p, int gb, const void *restrict v, const uint16_t *restrict vs,
    const int64_t *restrict sl, int64_t j0, int64_t j1, int KV, int kvh, int D16, int L,
    float *restrict rp, int t) {
    __m512 acc[16]; /* (gb, D16), gb * D16 <= 16 */
    for (int x = 0; x < gb * D16; x++) acc[x] = _mm512_setzero_ps();
    for (int64_t j = j0; j < j1; j++) {
        const int64_t row = sl[j] * KV + kvh;
        const void *vj = kv_row(v, t, row, D16 * 16);
        const float sc = kv_scale(vs, t, row);
        __m512 vals[8];
        for (int c = 0; c < D16; c++) vals[c] = kv_load16(vj, t, 16 * c);
        for (int g = 0; g < gb; g++) {
            const __m512 pg = _mm512_set1_ps(kv_scaled(t) ? p[(int64_t)g * L + j] * sc
                                                          : p[(int64_t)g * L + j]);
            for (int c = 0; c < D16; c++)
                acc[g * D16 + c] = _mm512_fmadd_ps(pg, vals[c], acc[g * D16 + c]);
        }
    }
    const size_t rec = (size_t)D16 * 16 + 2;
    for (int g = 0; g < gb; g++)
        for (int c = 0; c < D16; c++) _mm512_storeu_ps(rp + g * rec + 2 + 16 * c, acc[g * D16 + c]);
}

/* The group's scores and values, heads GB_KEYS (scores) and 16 / D16 (values) at a time;
 * gb and D made constants for the register allocation, t from KV_DISPATCH. */
static inline __attribute__((always_inline)) void group_scores_t(
    const float *q, int gb, const void *k, const uint16_t *ks, const int64_t *sl, int64_t j0,
    int64_t j1, int KV, int kvh, int D, int L, float *s, float *mx, int t) {
    if (gb == 3) group_scores(q, 3, k, ks, sl, j0, j1, KV, kvh, D, L, s, mx, t);
    else if (gb == 2) group_scores(q, 2, k, ks, sl, j0, j1, KV, kvh, D, L, s, mx, t);
    else group_scores(q, 1, k, ks, sl, j0, j1, KV, kvh, D, L, s, mx, t);
}

static inline __attribute__((always_inline)) void group_values_t(
    const float *p, int gb, const void *v, const uint16_t *vs, const int64_t *sl, int64_t j0,
    int64_t j1, int KV, int kvh, int D, int L, float *rp, int t) {
    if (D == 64) {
        if (gb == 4) group_values(p, 4, v, vs, sl, j0, j1, KV, kvh, 4, L, rp, t);
        else if (gb == 3) group_values(p, 3, v, vs, sl, j0, j1, KV, kvh, 4, L, rp, t);
        else if (gb == 2) group_values(p, 2, v, vs, sl, j0, j1, KV, kvh, 4, L, rp, t);
        else group_values(p, 1, v, vs, sl, j0, j1, KV, kvh, 4, L, rp, t);
    } else {
        if (gb == 2) group_values(p, 2, v, vs, sl, j0, j1, KV, kvh, 8, L, rp, t);
        else group_values(p, 1, v, vs, sl, j0, j1, KV, kvh, 8, L, rp, t);
    }
}

/* attend_range for D of 64 or 128 on AVX-512: the same records. */
static void attend_range_groups(const float *restrict qs, const KVLayer *kv,
                                const int64_t *restrict sl, int64_t j0, int64_t j1, int L, int G,
                                int KV, int kvh, int D, float *restrict scores,
                                float *restrict rp) {
    const size_t rec = (size_t)D + 2;
    for (int g0 = 0; g0 < G; g0 += GB_KEYS) {
        const int gb = G - g0 < GB_KEYS ? G - g0 : GB_KEYS;
        float mx[GB_KEYS];
        KV_DISPATCH(kv->kt, group_scores_t, qs + (size_t)g0 * D, gb, kv->k, kv->ks, sl, j0, j1,
                    KV, kvh, D, L, scores + (int64_t)g0 * L, mx);
        for (int g = 0; g < gb; g++)
            exp_record(scores + (int64_t)(g0 + g) * L, j0, j1, mx[g], rp + (g0 + g) * rec);
    }
    const int gv = D == 64 ? 4 : 2; /* heads per pass over the values */
    for (int g0 = 0; g0 < G; g0 += gv) {
        const int gb = G - g0 < gv ? G - g0 : gv;
        KV_DISPATCH(kv->vt, group_values_t, scores + (int64_t)g0 * L, gb, kv->v, kv->vs, sl, j0,
                    j1, KV, kvh, D, L, rp + g0 * rec);
    }
}
#endif

#define MAX_GD 4096 /* G * D held in registers/stack per work item: 16 heads x 256 */

/* Partial attention of one sequence's G query heads (qs: (G, D), scaled) over its keys
 * j0 .. j1-1 (slots sl), for KV head kvh: per head g, rec[g] = (max score, sum of
 * exps, sum of exp-weighted values (D)). scores: (G, L) scratch. */
static void attend_range(const float *restrict qs, const KVLayer *kv,
                         const int64_t *restrict sl, int64_t j0, int64_t j1, int L, int G,
                         int KV, int kvh, int D, float *restrict scores, float *restrict rp) {
#ifdef ATTN_AVX512
    if (D == 64 || D == 128) {
        attend_range_groups(qs, kv, sl, j0, j1, L, G, KV, kvh, D, scores, rp);
        return;
    }
#endif
    const size_t rec = (size_t)D + 2;
    for (int g = 0; g < G; g++) {
        float *restrict sg = scores + (int64_t)g * L;
        float mx = -INFINITY;
        KV_DISPATCH(kv->kt, mx = key_scores, qs + g * D, kv->k, kv->ks, sl, j0, j1, KV, kvh, D,
                    sg);
        exp_record(sg, j0, j1, mx, rp + g * rec);
    }
    KV_DISPATCH(kv->vt, head_values, scores, kv->v, kv->vs, sl, j0, j1, L, G, KV, kvh, D, rp);
}

/* Keys are attended in ranges at fixed key positions, RANGE_KEYS apart (split-K, as
 * flash-decoding does): each range gives a record (max, sum of exps, weighted values)
 * and the records are merged in key order. A range's record depends on nothing but the
 * sequence's query and keys, and the merge on the records, so a row's result is the
 * same whatever shares the step and however many threads run it.
 *
 * Shared prefixes (cascade): sequences whose first key lies in the same slot belong to
 * the group of the first of them (leader[b]); the whole ranges that lie inside the
 * group's common prefix (prefix-cached blocks, the same slots for every member) are
 * attended by one work item per range and KV head for all members, one after the other
 * with the same arithmetic each would have alone, so each range's keys and values come
 * from memory once for the group and from cache for the rest (16 requests behind a
 * 1,000-token system prompt read its KV once a step instead of 16 times). The k + 1
 * rows of a speculative verification are such a group too. */
#define RANGE_KEYS 256

static int64_t common_prefix(const int64_t *a, const int64_t *b, int64_t n) {
    int64_t j = 0;
    while (j < n && a[j] == b[j]) j++;
    return j;
}

/* A unit of work: keys j0 .. j1-1 of KV head kvh, for every member of b's group (group),
 * or of sequence b alone (not group), every KV head (kvh -1: the heads of a slot lie
 * side by side, so one item reads its keys' rows as one stream; an item per head read
 * each head's lines apart and, at 16 sequences of 2,000 keys, ran int8 at a third of
 * the machine's bandwidth) or, where there are fewer items than threads, head kvh; the
 * result goes to record r of each sequence. */
typedef struct {
    int b, kvh, r, group;
    int64_t j0, j1;
} Item;

void paged_decode(const float *restrict q, const KVLayer *kv, const int64_t *restrict slots,
                  const int64_t *restrict lens, int B, int L, int H, int KV, int D, float scale,
                  float *restrict out) {
    const int G = H / KV;
    int *leader = malloc(sizeof(int) * B);
    int64_t *shared = calloc(B, sizeof(int64_t));
    for (int b = 0; b < B; b++) {
        leader[b] = b;
        for (int a = 0; a < b; a++)
            if (leader[a] == a && lens[a] > 0 && lens[b] > 0 &&
                slots[(int64_t)a * L] == slots[(int64_t)b * L]) {
                leader[b] = a;
                break;
            }
    }
    /* The group's prefix: the shortest common run of slots of a member with its leader,
     * leaving each member at least its last key (the new token's) of its own. */
    for (int a = 0; a < B; a++) {
        if (leader[a] != a) continue;
        int64_t p = lens[a] - 1, members = 0;
        for (int b = a + 1; b < B; b++)
            if (leader[b] == a) {
                const int64_t n = lens[b] - 1 < p ? lens[b] - 1 : p;
                p = common_prefix(slots + (int64_t)a * L, slots + (int64_t)b * L, n);
                members++;
            }
        p = p / RANGE_KEYS * RANGE_KEYS; /* whole ranges only: the alone path's ranges */
        if (members == 0 || p == 0) {
            for (int b = a; b < B; b++)
                if (leader[b] == a) leader[b] = b; /* nothing shared: each on its own */
            continue;
        }
        for (int b = a; b < B; b++)
            if (leader[b] == a) shared[b] = p;
    }
    /* Record r of every row is its range r (keys r * RANGE_KEYS on): a group's items
     * write the ranges inside its prefix, each row's own items the rest. */
    int R = 1;
    for (int b = 0; b < B; b++) {
        const int n = (int)((lens[b] + RANGE_KEYS - 1) / RANGE_KEYS);
        R = n > R ? n : R;
    }
    Item *items = malloc(sizeof(Item) * (size_t)(2 * KV + 1) * B * R);
    int n_items = 0;
    for (int kvh = 0; kvh < KV; kvh++)
        for (int b = 0; b < B; b++)
            if (leader[b] == b)
                for (int64_t j0 = 0; j0 < shared[b]; j0 += RANGE_KEYS)
                    items[n_items++] =
                        (Item){b, kvh, (int)(j0 / RANGE_KEYS), 1, j0, j0 + RANGE_KEYS};
    int alone = 0; /* the items of every head of a sequence's own ranges */
    for (int b = 0; b < B; b++) alone += (int)((lens[b] - shared[b] + RANGE_KEYS - 1) / RANGE_KEYS);
    /* Fewer of those than threads (one short sequence: decode at batch 1): an item per
     * KV head instead, so that every thread has a share (the same arithmetic per head). */
    const int per_head = n_items + alone < omp_get_max_threads();
    const int kv0 = per_head ? 0 : -1, kv1 = per_head ? KV : 0; /* kvh -1: every head */
    for (int b = 0; b < B; b++)
        for (int64_t j0 = shared[b]; j0 < lens[b]; j0 += RANGE_KEYS) {
            const int64_t end = j0 + RANGE_KEYS < lens[b] ? j0 + RANGE_KEYS : lens[b];
            for (int kvh = kv0; kvh < kv1; kvh++)
                items[n_items++] = (Item){b, kvh, (int)(j0 / RANGE_KEYS), 0, j0, end};
        }
    /* Per (b, kvh, record, g): the range's max score, sum of exps, weighted values (D).
     * Records no item writes stay empty: their sums are zeroed here (the merge reads
     * nothing else of an empty record; zeroing all of it would write 20 MB a step at 16
     * sequences behind a 1,008-token prefix). */
    const size_t rec = (size_t)D + 2, n_rec = (size_t)B * KV * R * G;
    float *part = malloc(sizeof(float) * n_rec * rec);
    for (size_t i = 0; i < n_rec; i++) part[i * rec + 1] = 0.0f;
#pragma omp parallel
    {
        float *restrict scores = malloc(sizeof(float) * (size_t)G * (size_t)L); /* (G, L) */
        float qs[MAX_GD]; /* (G, D): the scaled queries of a sequence */
#pragma omp for schedule(dynamic, 1)
        for (int i = 0; i < n_items; i++) {
            const Item it = items[i];
            const int h0 = it.kvh >= 0 ? it.kvh : 0, h1 = it.kvh >= 0 ? it.kvh + 1 : KV;
            for (int b = it.b; b < (it.group ? B : it.b + 1); b++) {
                if (it.group && leader[b] != it.b) continue;
                for (int kvh = h0; kvh < h1; kvh++) {
                    const int64_t head0 = (int64_t)b * H + (int64_t)kvh * G;
                    float *rp = part + (((size_t)b * KV + kvh) * R + it.r) * G * rec;
                    for (int x = 0; x < G * D; x++) qs[x] = q[head0 * D + x] * scale;
                    if (it.j1 > it.j0)
                        attend_range(qs, kv, slots + (int64_t)b * L, it.j0, it.j1, L, G, KV,
                                     kvh, D, scores, rp);
                }
            }
        }
        free(scores);
        /* Merge the ranges: out = sum_r acc_r e^(mx_r - M) / sum_r sum_r e^(mx_r - M). */
#pragma omp for collapse(2)
        for (int b = 0; b < B; b++) {
            for (int h = 0; h < H; h++) {
                const int kvh = h / G, g = h % G;
                const float *rb = part + ((size_t)b * KV + kvh) * R * G * rec + g * rec;
                float m = -INFINITY, total = 0.0f;
                for (int r = 0; r < R; r++) {
                    const float *x = rb + r * G * rec;
                    if (x[1] != 0.0f && x[0] > m) m = x[0];
                }
                float *o = out + ((int64_t)b * H + h) * D;
                for (int d = 0; d < D; d++) o[d] = 0.0f;
                for (int r = 0; r < R; r++) {
                    const float *x = rb + r * G * rec;
                    if (x[1] == 0.0f) continue; /* an empty range */
                    const float w = exp_nonpositive(x[0] - m);
                    total += x[1] * w;
#pragma omp simd
                    for (int d = 0; d < D; d++) o[d] += x[2 + d] * w;
                }
                const float inv = total > 0.0f ? 1.0f / total : 0.0f;
                for (int d = 0; d < D; d++) o[d] *= inv;
            }
        }
    }
    free(part);
    free(items);
    free(leader);
    free(shared);
}
