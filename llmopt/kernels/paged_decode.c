/* Decode attention over a paged KV cache, reading keys and values in place.
 *
 * One query token per sequence. For sequence b, its visible keys are the cache slots
 * slots[b, 0 .. lens[b]-1] (any order of blocks). A torch version has to gather those
 * slots into a new tensor first, copying every sequence's whole KV each step; this
 * loop reads each key and value once, with an online softmax (running max and sum),
 * so nothing is copied.
 *
 * Shapes (fp32, contiguous): q (B, H, D); k, v (S, KV, D); slots (B, L) int64;
 * lens (B,) int64; out (B, H, D). Query head h reads KV head h / (H / KV).
 */
#include <math.h>
#include <stdint.h>

void paged_decode(const float *q, const float *k, const float *v, const int64_t *slots,
                  const int64_t *lens, int B, int L, int H, int KV, int D, float scale,
                  float *out) {
    const int group = H / KV;
#pragma omp parallel for collapse(2) schedule(static)
    for (int b = 0; b < B; b++) {
        for (int h = 0; h < H; h++) {
            const float *qh = q + ((int64_t)b * H + h) * D;
            float *o = out + ((int64_t)b * H + h) * D;
            const int kvh = h / group;
            float m = -INFINITY, l = 0.0f;
            for (int d = 0; d < D; d++) o[d] = 0.0f;
            for (int64_t j = 0; j < lens[b]; j++) {
                const int64_t slot = slots[(int64_t)b * L + j];
                const float *kj = k + (slot * KV + kvh) * D;
                const float *vj = v + (slot * KV + kvh) * D;
                float s = 0.0f;
                for (int d = 0; d < D; d++) s += qh[d] * kj[d];
                s *= scale;
                if (s > m) {  /* rescale what was accumulated under the old max */
                    const float c = expf(m - s);
                    l *= c;
                    for (int d = 0; d < D; d++) o[d] *= c;
                    m = s;
                }
                const float p = expf(s - m);
                l += p;
                for (int d = 0; d < D; d++) o[d] += p * vj[d];
            }
            const float inv = l > 0.0f ? 1.0f / l : 0.0f;
            for (int d = 0; d < D; d++) o[d] *= inv;
        }
    }
}
