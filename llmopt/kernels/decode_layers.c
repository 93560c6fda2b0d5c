/* All decoder blocks of a Llama-family model (Llama, Mistral, Qwen2 and 3, Gemma 3) for
 * the decode step of a few sequences, in one call: the loop that models/llama.py (and
 * gemma3.py) runs in Python, over the same kernels.
 *
 * Why: at decode a block is about 30 small operations; from Python each costs
 * microseconds of dispatch, which for a 135M-parameter model is more than the weights
 * take to read. Here the loop is C and each operation is a direct call. The arithmetic
 * is the Python path's, kernel for kernel (rmsnorm.c, qgemv.c, gemv_bf16.c,
 * rope_store.c, paged_decode.c), including where it rounds to the model's dtype.
 *
 * Per block, for M rows (one new token per sequence; hidden E, heads H, KV heads KV,
 * head dim D, MLP width I), with residual += x fused into each norm:
 *   h = norm1(x [+ residual]); qkv = h Wqkv^T; [q, k = qnorm(q), knorm(k) per head];
 *   q = rope(q), cache <- rope(k), v; a = attention(q, cache) (fp32, rounded to the
 *   dtype); o = a Wo^T [o = attn_out_norm(o)]; h = norm2(o + residual);
 *   g, u = h Wgu^T; x = (act(g) * u) Wdown^T [x = mlp_out_norm(x)]
 * with act SiLU or GELU (tanh), and the bracketed steps where a block has them (Qwen3's
 * and Gemma 3's q/k norms, Gemma 3's norms of the attention's and the MLP's outputs).
 * Each block reads its own rotary rows and its own view of the keys (a sliding-window
 * layer's last `window` keys): one of `n_views` given per call.
 * On return x holds the last block's MLP output and residual the stream before it
 * (the caller adds them in its final norm). Block 0 takes residual = x (no add), or,
 * with `continues`, adds x into the residual stream given (a pipeline stage going on
 * from the previous stage's last block, with that block's own fused add).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "gemv_bf16.c"
#include "glu_mul.c"
#include "kv_types.h"
#include "paged_decode.c"
#include "qgemv.c"
#include "rmsnorm.c"
#include "rope_store.c"

typedef struct {
    int bits;           /* 16: dense bf16; 4 or 8: qgemv's layouts */
    const void *w;      /* (N, K) bf16, or qgemv's operand */
    const void *scale;  /* quantized: qgemv's scale, offset and meta */
    const void *offset;
    int group;
    int meta;
    int codebook; /* qgemv's CODEBOOK_* */
    const float *bias;   /* (N,) fp32 or NULL */
    const int64_t *perm; /* (K,) act-order input order (column j reads input perm[j]) or NULL */
    int N, K;
} DLinear;

typedef struct {
    const void *norm1, *norm2; /* (E,) in the model's dtype */
    DLinear qkv, o, gate_up, down;
    const void *q_norm, *k_norm;              /* (D,) per-head norms, or NULL */
    const void *attn_out_norm, *mlp_out_norm; /* (E,) norms of o and of the MLP's x, or NULL */
    int gelu;                                 /* the gate's activation: GELU (tanh), or SiLU */
    int view;                                 /* which of the call's views it reads */
} DLayer;

/* What one kind of block reads (per view: a sliding window's, or every key's): its
 * rotary rows (M, D) in the model's dtype, and each row's keys: slots (M, L), lens. */
typedef struct {
    const void *cos, *sin;
    const int64_t *slots, *lens;
    int L;
} DView;

static int linear(const DLinear *l, const void *x, int x_bf16, int M, void *y, int y_bf16) {
    if (l->bits == 16) return gemv_bf16(x, x_bf16, M, l->K, l->w, l->N, l->bias, y, y_bf16);
    if (x_bf16 != y_bf16) return -1; /* qgemv writes in x's dtype */
    return qgemv(x, x_bf16, M, l->K, l->perm, l->w, l->bits, l->scale, l->offset, l->group,
                 l->meta, l->codebook, l->N, l->bias, y, y_bf16);
}

int decode_layers(const DLayer *layers, int n_layers, void *x, void *residual, int M, int E,
                  int H, int KV, int D, int I, float eps, int bf16, const DView *views,
                  const KVLayer *kv, const int64_t *write_slots, float scale, int continues) {
    const size_t el = bf16 ? 2 : 4;
    const int qkv_n = (H + 2 * KV) * D;
    char *h = malloc(el * M * E), *qkv = malloc(el * M * qkv_n), *gu = malloc(el * M * 2 * I);
    const int widest = I > H * D ? I : H * D; /* the linears' inputs: E, H * D, I */
    char *act = malloc(el * M * widest);
    float *q = malloc(sizeof(float) * M * H * D), *att = malloc(sizeof(float) * M * H * D);
    int rc = (h && qkv && gu && act && q && att) ? 0 : -1;
    for (int i = 0; i < n_layers && rc == 0; i++) {
        const DLayer *ly = layers + i;
        if (i == 0 && !continues) {
            memcpy(residual, x, el * M * E);
            rmsnorm(x, NULL, ly->norm1, h, M, E, eps, bf16);
        } else {
            rmsnorm(x, residual, ly->norm1, h, M, E, eps, bf16);
        }
        const DView *v = views + ly->view;
        rc |= linear(&ly->qkv, h, bf16, M, qkv, bf16);
        /* norms in place: each row's sum of squares comes before any of its writes */
        if (ly->q_norm)
            for (int m = 0; m < M; m++) {
                char *row = qkv + el * m * qkv_n;
                rmsnorm(row, NULL, ly->q_norm, row, H, D, eps, bf16);
                rmsnorm(row + el * H * D, NULL, ly->k_norm, row + el * H * D, KV, D, eps, bf16);
            }
        rope_store(qkv, qkv_n, v->cos, v->sin, bf16, M, H, KV, D, kv + i, write_slots, q);
        paged_decode(q, kv + i, v->slots, v->lens, M, v->L, H, KV, D, scale, att);
        for (size_t j = 0; j < (size_t)M * H * D; j++) store_elem(act, j, att[j], bf16);
        rc |= linear(&ly->o, act, bf16, M, x, bf16);
        if (ly->attn_out_norm) rmsnorm(x, NULL, ly->attn_out_norm, x, M, E, eps, bf16);
        rmsnorm(x, residual, ly->norm2, h, M, E, eps, bf16);
        rc |= linear(&ly->gate_up, h, bf16, M, gu, bf16);
        glu_mul(gu, act, M, I, bf16, ly->gelu);
        rc |= linear(&ly->down, act, bf16, M, x, bf16);
        if (ly->mlp_out_norm) rmsnorm(x, NULL, ly->mlp_out_norm, x, M, E, eps, bf16);
    }
    free(h);
    free(qkv);
    free(gu);
    free(act);
    free(q);
    free(att);
    return rc;
}
