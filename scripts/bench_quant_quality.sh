#!/usr/bin/env bash
# Size and quality of every quantization of one model, through the CLI users run:
# `llmopt quantize` with perplexity before and after on held-out text (the second
# half of pydoc_data.topics; calibration reads the first half).
#
#   scripts/bench_quant_quality.sh [MODEL] [PPL_TOKENS] > results.jsonl
#
# One JSON line per configuration on stdout (the fields of `llmopt quantize --json`),
# progress on stderr; the outputs go to a temporary folder that is removed at the end.
set -euo pipefail
model="${1:-smollm2-135m-instruct}"
tokens="${2:-2048}"
out="$(mktemp -d)"
export LLMOPT_HOME="${LLMOPT_HOME:-$HOME/.cache/llmopt}"
trap 'rm -rf "$out"' EXIT
run() {  # NAME ARGS...
  local name="$1"
  shift
  echo "== $name" >&2
  llmopt quantize "$model" "$@" -o "$out/$name" --name "bench-quality-$name" --force \
    --ppl-tokens "$tokens" --threads 2 --json
  llmopt rm "bench-quality-$name" >/dev/null 2>&1
}
run int8-rtn --int8
for g in 64 32; do
  run "int4-rtn-g$g" --int4 --method rtn --group-size "$g"
  run "int4-gptq-g$g" --int4 --method gptq --group-size "$g"
  run "int4-awq-g$g" --int4 --method awq --group-size "$g"
done
# Each method with the other calibration order (GPTQ defaults to block by block on
# the quantized blocks' outputs, AWQ to one full-precision pass).
run int4-gptq-g32-one-pass --int4 --method gptq --group-size 32 --one-pass
for g in 64 32; do
  run "int4-awq-g$g-sequential" --int4 --method awq --group-size "$g" --sequential
done
run int4-gptq-g32-head8 --int4 --method gptq --group-size 32 --lm-head
run int4-gptq-g32-head4 --int4 --method gptq --group-size 32 --lm-head --lm-head-bits 4
