/* Causal prefill attention over a paged KV cache, in fp32, reading keys and values in
 * place in the cache's types (attn_tiles.h, kv_types.h). For every prefill chunk of a step in one call.
 *
 * Chunk c: its queries are rows q_start .. q_start+q_len-1 of the step's flat batch, at
 * positions start .. start+q_len-1; its keys are positions 0 .. start+q_len-1, in the
 * cache slots slots[slot_off ..] (the keys of this step's own tokens already written).
 * Query at position p sees keys 0 .. p. Shapes: q, out (N, H, D) fp32; kv the layer's cache (S, KV, D);
 * chunks (n_chunks, 4) int64: q_start, q_len, start, slot_off. Query head h reads KV
 * head h / (H / KV).
 *
 * Work item: a run of up to ROW_TOKENS tokens of one chunk for one KV head, its
 * tokens' G query heads the rows of one tile block, attending to every key chunk up to
 * its last token's position. Torch's flash kernel needs each chunk's keys gathered
 * into a copy first; this reads them where they lie, for every chunk of the step at
 * once. Each item transposes its keys again, the shared prefix's too: grouping the
 * chunks behind one prefix, as decode does, would save that.
 *
 * Returns 0, or -1 when built without AVX-512 or for D % 64 != 0 (the caller falls
 * back to torch). */
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>

#include "attn_tiles.h"
#include "kv_types.h"

#define ROW_TOKENS 64

int paged_prefill(const float *restrict q, const KVLayer *kv, const int64_t *restrict slots,
                  const int64_t *restrict chunks, int n_chunks, int H, int KV, int D,
                  float scale, float *restrict out) {
#ifdef __AVX512F__
    if (D % 64 != 0) return -1;
    const int G = H / KV;
    int64_t n_items = 0;
    for (int c = 0; c < n_chunks; c++)
        n_items += KV * ((chunks[4 * c + 1] + ROW_TOKENS - 1) / ROW_TOKENS);
    int64_t *items = malloc(sizeof(int64_t) * 3 * (size_t)n_items); /* chunk, kvh, t0 */
    int64_t at = 0;
    for (int c = 0; c < n_chunks; c++)
        for (int64_t t0 = 0; t0 < chunks[4 * c + 1]; t0 += ROW_TOKENS)
            for (int kvh = 0; kvh < KV; kvh++) {
                items[at++] = c;
                items[at++] = kvh;
                items[at++] = t0;
            }
#pragma omp parallel
    {
        const Tiles t = tiles_alloc((int64_t)ROW_TOKENS * G, D);
#pragma omp for schedule(dynamic, 1)
        for (int64_t i = 0; i < n_items; i++) {
            const int64_t *ch = chunks + 4 * items[3 * i];
            const int kvh = (int)items[3 * i + 1];
            const int64_t t0 = items[3 * i + 2], q_start = ch[0], start = ch[2];
            const int64_t tokens = ch[1] - t0 < ROW_TOKENS ? ch[1] - t0 : ROW_TOKENS;
            const int64_t used = tokens * G;
            for (int64_t r = 0; r < tokens; r++) {
                const float *src = q + ((q_start + t0 + r) * H + (int64_t)kvh * G) * D;
                for (int x = 0; x < G * D; x++) t.q[r * G * D + x] = src[x] * scale;
            }
            tiles_reset(&t, used, D);
            /* Row x: token t0 + x / G at position start + t0 + x / G sees the keys
             * before start + t0 + x / G + 1. */
            const int64_t limit0 = start + t0 + 1;
            tiles_attend(&t, used, G, limit0, 0, limit0 + tokens - 1, kv, slots + ch[3], KV, kvh,
                         D);
            for (int64_t r = 0; r < tokens; r++)
                for (int g = 0; g < G; g++) {
                    const int64_t x = r * G + g;
                    const float inv = 1.0f / t.l[x];
                    float *o = out + ((q_start + t0 + r) * H + (int64_t)kvh * G + g) * D;
                    const float *a = t.acc + x * D;
#pragma omp simd
                    for (int d = 0; d < D; d++) o[d] = a[d] * inv;
                }
        }
        free(t.q);
    }
    free(items);
    return 0;
#else
    (void)q, (void)kv, (void)slots, (void)chunks, (void)n_chunks, (void)H, (void)KV,
        (void)D, (void)scale, (void)out;
    return -1;
#endif
}
