/* Rotary embedding of the new tokens' queries and keys, and the store of their keys and
 * values into the paged KV cache, in one pass over the fused qkv projection:
 *
 *   q_out[t, h]                 = rotate(q[t, h], pos t)   (fp32, for the attention)
 *   k_cache[slots[t], kv]      = rotate(k[t, kv], pos t)  (in the cache's type)
 *   v_cache[slots[t], kv]      = v[t, kv]
 *
 * rotate is the rotate-half form: pairs (i, i + D/2), x1 * cos - x2 * sin and
 * x2 * cos + x1 * sin, with the rows of cos/sin already gathered for each token.
 * In torch this is a dozen ops per layer (slice, negate, concatenate, two multiplies,
 * an add, split, two casts, two index copies), each a few microseconds of dispatch at
 * decode. For bf16 every product and sum is rounded to bf16 as torch's ops round them,
 * so the result is bit-identical to the torch path, whose rounding is part of the
 * model's behaviour: more precise rotary changes greedy answers in bf16.
 *
 * qkv: (N, row) fp32 or bf16 with `row` elements between tokens and q, k, v heads
 * side by side ((H + 2 KV) * D used); cos, sin: (N, D) in qkv's dtype;
 * kv: the layer's cache (kv_types.h), each key and value row stored in its type by
 * kv_store; slots: (N,) int64; q_out: (N, H, D) fp32. Needs D <= MAX_HEAD_DIM.
 */
#include <stdint.h>
#include <string.h>

#include "dtype.h"
#include "kv_types.h"

#define MAX_HEAD_DIM 512

void rope_store(const void *qkv, int64_t row, const void *cos, const void *sin, int bf16, int N,
                int H, int KV, int D, const KVLayer *kv, const int64_t *slots, float *q_out) {
    const int half = D / 2;
    float kr[MAX_HEAD_DIM]; /* a rotated key, before the store rounds it to the cache's type */
    for (int t = 0; t < N; t++) {
        const size_t base = (size_t)t * row;
        for (int h = 0; h < H + KV; h++) {
            float *dst = h < H ? q_out + ((size_t)t * H + h) * D : kr;
            const size_t src = base + (size_t)h * D;
#pragma omp simd
            for (int i = 0; i < half; i++) {
                const float x1 = load_elem(qkv, src + i, bf16), x2 = load_elem(qkv, src + i + half, bf16);
                const size_t c = (size_t)t * D + i;
                const float c1 = load_elem(cos, c, bf16), s1 = load_elem(sin, c, bf16);
                const float c2 = load_elem(cos, c + half, bf16), s2 = load_elem(sin, c + half, bf16);
                dst[i] = round_to(round_to(x1 * c1, bf16) - round_to(x2 * s1, bf16), bf16);
                dst[i + half] = round_to(round_to(x2 * c2, bf16) + round_to(x1 * s2, bf16), bf16);
            }
            if (h >= H) kv_store(kv->k, kv->ks, kv->kt, slots[t] * KV + (h - H), kr, D);
        }
        for (int h = 0; h < KV; h++) {
            const size_t vs = base + (size_t)(H + KV + h) * D;
            for (int i = 0; i < D; i++) kr[i] = load_elem(qkv, vs + i, bf16);
            kv_store(kv->v, kv->vs, kv->vt, slots[t] * KV + h, kr, D);
        }
    }
}
