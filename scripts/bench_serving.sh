#!/usr/bin/env bash
# Serving comparison for BENCHMARKS.md: llmopt serve against llama.cpp's llama-server
# and llama-cpp-python's server, same GGUF file, same `llmopt bench` command shape.
#
#   LLAMA_SERVER=/path/to/llama-server scripts/bench_serving.sh [OUT_DIR]
#
# llama-server is built from the llama-cpp-python sdist's vendored llama.cpp
# (cmake -B build && cmake --build build --target llama-server); it is never committed.
# On a CPU with AMX, build it with -DGGML_NATIVE=OFF and the CPU's AVX-512 flags but
# without GGML_AMX_*: the native build's AMX path dies of an illegal instruction
# (tileloadd) at the first Q4_1 product (seen on a 2-core Xeon VM, 2026-11-27).
# Each server gets the machine alone; 2 threads each; 16 parallel slots for llama-server.
# LLAMA_CPP_PYTHON=0 skips llama-cpp-python's server (built natively it dies the same
# way on AMX machines).
set -euo pipefail

OUT=${1:-bench-results}
THREADS=${THREADS:-2}
PY=${PYTHON:-.venv/bin/python}
LLMOPT="$PY -m llmopt"
GGUF=$($PY -c "from llmopt.store.fetch import pull; from llmopt.store.store import Store; from rich.console import Console; print(pull(Store(), 'smollm2-135m-instruct', Console(stderr=True)))")
mkdir -p "$OUT"

wait_up() { for _ in $(seq 300); do curl -sf "$1/v1/models" >/dev/null 2>&1 && return 0; sleep 0.5; done; return 1; }

run_suite() {  # name url
    local name=$1 url=$2
    echo "== $name: load $(cut -d' ' -f1 /proc/loadavg)" >&2
    $LLMOPT bench --url "$url" --model smollm2 --workload random --input-len 64 --output-len 64 \
        -n 32 --sweep concurrency=1,4,16 --seed 0 --output "$OUT/$name-random.json"
    $LLMOPT bench --url "$url" --model smollm2 --workload shared-prefix --num-prefixes 1 \
        --prefix-len 1000 --output-len 64 -n 32 -c 16 --seed 0 --output "$OUT/$name-prefix.json"
    # The same with the system prompt served once before (a deployment's steady state);
    # seed 1: questions (and a system prompt) the run above did not cache.
    $LLMOPT bench --url "$url" --model smollm2 --workload shared-prefix --num-prefixes 1 \
        --prefix-len 1000 --output-len 64 -n 32 -c 16 --seed 1 --warm-prefixes \
        --output "$OUT/$name-prefix-warm.json"
}

# llmopt serve (the engine in its own process; the file's Q4_1/Q8_0 blocks as stored)
$LLMOPT serve "$GGUF" --port 8801 --threads "$THREADS" --served-model-name smollm2 \
    --no-response-cache --log-level warning & PID=$!
wait_up http://127.0.0.1:8801 && run_suite llmopt http://127.0.0.1:8801
kill -TERM $PID; wait $PID || true

if [ -n "${LLAMA_SERVER:-}" ]; then
    "$LLAMA_SERVER" -m "$GGUF" -t "$THREADS" -np 16 -c 32768 --port 8802 --log-disable & PID=$!
    wait_up http://127.0.0.1:8802 && run_suite llama-server http://127.0.0.1:8802
    kill -TERM $PID; wait $PID || true
fi

[ "${LLAMA_CPP_PYTHON:-1}" = 0 ] && exit 0
$PY -m llama_cpp.server --model "$GGUF" --n_threads "$THREADS" --n_ctx 4096 --port 8803 \
    > "$OUT/llama_cpp_server.log" 2>&1 & PID=$!
wait_up http://127.0.0.1:8803 && run_suite llama-cpp-python http://127.0.0.1:8803
kill -TERM $PID; wait $PID || true
