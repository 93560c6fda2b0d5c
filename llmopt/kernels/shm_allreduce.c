/* Sum (shm_allreduce) or concatenation (shm_allgather) of one vector from each of
 * `world` processes on one host, through a shared memory segment: tensor parallelism's
 * collectives (distributed/collectives.py) without a socket.
 *
 * Why: a decode step of a split model does two all-reduces a layer of one token's hidden
 * state (a few KB). Over gloo each is several thread hand-offs and socket round trips
 * (hundreds of microseconds on a small VM); here it is a copy, a flag, a wait and a sum.
 *
 * Segment: `world` flags of 64 bytes (one cache line each: a rank writes only its own),
 * then two sets of `world` buffers of `slot` bytes. Call `seq` (1, 2, ... the same on
 * every rank) writes the set seq % 2: a rank can only come back to that set at call
 * seq + 2, after every rank has raised its flag to seq + 1, which it does only once it
 * has read the buffers of call seq. The sum runs in rank order on every rank, so every
 * rank gets the same bits (fp32 accumulation; bf16 vectors are rounded once at the end).
 *
 * A rank waits by spinning briefly, then yielding the core (ranks may share cores).
 * It gives up with -1 after timeout_s, or -2 as soon as a peer's process is gone.
 */
#include <errno.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <sys/types.h>
#include <time.h>

#include "dtype.h"

#define FLAG_BYTES 64

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static int64_t *flag(void *base, int r) { return (int64_t *)((char *)base + (size_t)r * FLAG_BYTES); }

/* Publish x (bytes) as this rank's part of call `seq` and wait for every rank's;
 * *parts: the call's buffer set, rank r's part at r * slot. */
static int publish(void *base, int rank, int world, int64_t seq, const void *x, size_t bytes,
                   int64_t slot, const int *pids, double timeout_s, char **parts) {
    char *bufs = (char *)base + (size_t)world * FLAG_BYTES + (size_t)(seq & 1) * world * slot;
    if ((int64_t)bytes > slot) return -3;
    memcpy(bufs + (size_t)rank * slot, x, bytes);
    __atomic_store_n(flag(base, rank), seq, __ATOMIC_RELEASE);
    const double deadline = now() + timeout_s;
    for (int r = 0; r < world; r++) {
        for (long spins = 0; __atomic_load_n(flag(base, r), __ATOMIC_ACQUIRE) < seq; spins++) {
            if (spins < 256) continue;
            sched_yield();
            if (spins % 1024 == 0) {
                if (kill(pids[r], 0) != 0 && errno == ESRCH) return -2;
                if (now() > deadline) return -1;
            }
        }
    }
    *parts = bufs;
    return 0;
}

int shm_allreduce(void *base, int rank, int world, int64_t seq, void *x, int n, int bf16,
                  int64_t slot, const int *pids, double timeout_s) {
    const size_t el = bf16 ? 2 : 4;
    char *bufs;
    const int rc = publish(base, rank, world, seq, x, n * el, slot, pids, timeout_s, &bufs);
    if (rc != 0) return rc;
    if (!bf16) { /* in rank order, vectorizable: ((b0 + b1) + b2) ... */
        float *y = x;
        memcpy(y, bufs, n * el);
        for (int r = 1; r < world; r++) {
            const float *b = (const float *)(bufs + (size_t)r * slot);
            for (int i = 0; i < n; i++) y[i] += b[i];
        }
        return 0;
    }
    for (int i = 0; i < n; i++) {
        float acc = load_elem(bufs, i, 1);
        for (int r = 1; r < world; r++) acc += load_elem(bufs + (size_t)r * slot, i, 1);
        ((uint16_t *)x)[i] = f32_to_bf16(acc);
    }
    return 0;
}

/* Every rank's `bytes` of x, rank r's at out + r * out_stride. */
int shm_allgather(void *base, int rank, int world, int64_t seq, const void *x, int64_t bytes,
                  void *out, int64_t out_stride, int64_t slot, const int *pids,
                  double timeout_s) {
    char *bufs;
    const int rc = publish(base, rank, world, seq, x, bytes, slot, pids, timeout_s, &bufs);
    if (rc != 0) return rc;
    for (int r = 0; r < world; r++)
        memcpy((char *)out + (size_t)r * out_stride, bufs + (size_t)r * slot, bytes);
    return 0;
}
