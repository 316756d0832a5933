#!/usr/bin/env bash
# One call on the GPU machine: build the extension, run the CUTLASS selftest, the test suite, and the
# benchmark, writing every log under $OUT. Usage: bash scripts/device_run.sh [build] [selftest] [tests] [bench]
# [profile] (no argument = the first four; profile = benchmarks/profile_stages.py $PROFILE_ARGS). Needs the nvidia-cutlass wheel in .whl/ (see README).
# The device copy's .git can lag the working tree: pass MOELORA_GIT_REV=<local git describe --dirty> to
# record the code the benchmark ran.
set -uo pipefail
OUT=${OUT:-/tmp/moelora_out}
mkdir -p "$OUT"
phases=${*:-build selftest tests bench}
start=$(date +%s)
elapsed() { echo $(( $(date +%s) - start )); }
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16}

python3 -m zipfile -e .whl/nvidia_cutlass-4.2.0.0-py3-none-any.whl /tmp/cutlass
export CUTLASS_DIR=/tmp/cutlass/cutlass_library/source
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv;
  python3 -c 'import torch,sys; print(sys.version); print("torch", torch.__version__, "cuda", torch.version.cuda)';
  python3 -m pip list 2>/dev/null | grep -i -E "^(transformers|peft|triton|safetensors|matplotlib) "; } > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

if [[ $phases == *build* ]]; then
  echo "== build ($(elapsed)s)"
  if ! python3 -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1; then
    grep -E "error|Error" "$OUT/build.log" | head -40; tail -20 "$OUT/build.log"; exit 1
  fi
  echo "built in $(elapsed)s"
fi
if [[ $phases == *selftest* ]] && [[ -f tools/build_expert_gemm_selftest.sh ]]; then
  echo "== selftest ($(elapsed)s)"
  bash tools/build_expert_gemm_selftest.sh /tmp/selftest > "$OUT/selftest_build.log" 2>&1 && /tmp/selftest 2>&1 | tee "$OUT/selftest.log" | tail -25
fi
if [[ $phases == *tests* ]]; then
  echo "== tests ($(elapsed)s)"
  timeout ${TEST_TIMEOUT:-300} python3 -m pytest -q -rfE --durations=15 --timeout=120 -p no:cacheprovider ${TEST_ARGS:-tests} > "$OUT/tests_all.log" 2>&1
  tail -25 "$OUT/tests_all.log"
fi
if [[ $phases == *bench* ]]; then
  echo "== bench ($(elapsed)s)"
  timeout ${BENCH_TIMEOUT:-300} python3 benchmarks/bench_moe.py --device cuda --out "$OUT/bench" ${BENCH_ARGS:-} > "$OUT/bench.log" 2>&1
  tail -40 "$OUT/bench.log"
  # Few files come back from the device: pack the benchmark outputs into one.
  [[ -d $OUT/bench ]] && tar czf "$OUT/bench.tgz" -C "$OUT" bench && rm -r "$OUT/bench"
fi
if [[ $phases == *profile* ]]; then
  echo "== profile ($(elapsed)s)"
  timeout ${PROFILE_TIMEOUT:-300} python3 benchmarks/profile_stages.py --json "$OUT/profile.json" ${PROFILE_ARGS:-} 2>&1 | tee "$OUT/profile.log" | grep -v "^  "
fi
echo "== done in $(elapsed)s"
