#!/usr/bin/env bash
# The CUDA checks, on a machine with a GPU and the benchmark model in the store
# (`llmopt pull`): the GPU tests, the engine, parity and server suites with the real
# model loaded on the GPU (LLMOPT_TEST_DEVICE=cuda), scripts/bench_cuda.py, and
# `llmopt bench --offline` of the model dense and quantized to int4 on the GPU.
#
#   bash scripts/gpu_check.sh [OUTDIR]     (logs, JUnit XML and the benchmark JSON)
set -uo pipefail
out=${1:-gpu-check}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 LLMOPT_TEST_DEVICE=cuda
py=${PYTHON:-python3}  # the interpreter that has torch (and llmopt importable)
"$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device')" || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
status=0
# The semantic-cache test needs the optional embeddings package; the GGUF-export and
# quantize-on-CPU tests need nothing of the GPU.
timeout 330 "$py" -m pytest -q -p no:cacheprovider --junitxml "$out/junit.xml" \
  tests/test_cuda.py tests/test_engine.py tests/test_parity.py tests/test_server.py \
  tests/test_server_errors.py tests/test_server_caches.py \
  tests/test_quantize.py::test_cuda_quantizes_and_runs_like_the_cpu \
  tests/test_quantize.py::test_cuda_bf16_runs_int4_on_torchs_kernel \
  -k "not semantic" 2>&1 | tee "$out/pytest.log" || status=1
timeout 240 "$py" scripts/bench_cuda.py --json >"$out/bench_cuda.json" 2>"$out/bench.log" || status=1
cat "$out/bench_cuda.json"
model=smollm2-135m-instruct
q4="$(mktemp -d)/q4"
{
  timeout 60 "$py" -m llmopt quantize $model --int4 --method rtn --group-size 64 \
    --device cuda --no-eval --json -o "$q4" &&
    for m in $model "$q4"; do
      timeout 45 "$py" -m llmopt bench "$m" --offline --device cuda --dtype bfloat16 --json
    done
} >"$out/offline.json" 2>>"$out/bench.log" || status=1
cat "$out/offline.json"
exit $status
