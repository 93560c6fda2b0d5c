/* AMX tile instructions in plain C, for testing qgemm_amx.c on CPUs without AMX: built
 * only with -DLLMOPT_AMX_EMULATED (qgemv.load(emulate_amx=True), for the tests), never
 * for running models. One set of 8 tiles per thread, each up to 16 rows of 64 bytes,
 * shaped by the loaded configuration; products as the instructions define them:
 *   C[m].dword[n] += sum_k sum_i A[m].byte[4k + i] * B[k].byte[4n + i]
 * (A unsigned for dpbusd, signed for dpbssd; B signed). */
#ifndef LLMOPT_AMX_EMULATED_H
#define LLMOPT_AMX_EMULATED_H
#include <stdint.h>
#include <string.h>

static __thread uint8_t emu_tiles[8][16][64];
static __thread int emu_rows[8], emu_colsb[8];

static void emu_loadconfig(const uint8_t *cfg) { /* palette, start_row, 14 reserved, ... */
    for (int t = 0; t < 8; t++) {
        uint16_t colsb;
        memcpy(&colsb, cfg + 16 + 2 * t, 2);
        emu_colsb[t] = colsb;
        emu_rows[t] = cfg[48 + t];
    }
}

static void emu_loadd(int t, const void *p, long stride) {
    for (int r = 0; r < emu_rows[t]; r++)
        memcpy(emu_tiles[t][r], (const char *)p + r * stride, emu_colsb[t]);
}

static void emu_stored(int t, void *p, long stride) {
    for (int r = 0; r < emu_rows[t]; r++)
        memcpy((char *)p + r * stride, emu_tiles[t][r], emu_colsb[t]);
}

static void emu_dp(int c, int a, int b, int a_signed) {
    for (int m = 0; m < emu_rows[c]; m++)
        for (int n = 0; n < emu_colsb[c] / 4; n++) {
            int32_t acc;
            memcpy(&acc, &emu_tiles[c][m][4 * n], 4);
            for (int k = 0; k < emu_colsb[a] / 4; k++)
                for (int i = 0; i < 4; i++) {
                    const uint8_t av = emu_tiles[a][m][4 * k + i];
                    acc += (a_signed ? (int8_t)av : av) * (int8_t)emu_tiles[b][k][4 * n + i];
                }
            memcpy(&emu_tiles[c][m][4 * n], &acc, 4);
        }
}

#undef _tile_loadconfig
#undef _tile_release
#undef _tile_zero
#undef _tile_loadd
#undef _tile_stored
#undef _tile_dpbusd
#undef _tile_dpbssd
#define _tile_loadconfig(cfg) emu_loadconfig((const uint8_t *)(cfg))
#define _tile_release() ((void)0)
#define _tile_zero(t) memset(emu_tiles[t], 0, sizeof emu_tiles[t])
#define _tile_loadd(t, p, stride) emu_loadd(t, p, stride)
#define _tile_stored(t, p, stride) emu_stored(t, p, stride)
#define _tile_dpbusd(c, a, b) emu_dp(c, a, b, 0)
#define _tile_dpbssd(c, a, b) emu_dp(c, a, b, 1)
#endif
