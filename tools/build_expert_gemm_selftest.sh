#!/usr/bin/env bash
# Builds the standalone sm_90a expert grouped-GEMM selftest (no torch):
#   CUTLASS_DIR=/path/to/cutlass_library/source bash tools/build_expert_gemm_selftest.sh OUTPUT_BINARY
# CUTLASS_DIR holds include/ and tools/util/include/ (the nvidia-cutlass wheel's cutlass_library/source).
# The translation units compile in parallel (each CUTLASS TU takes about a minute).
set -euo pipefail

OUT_BIN=${1:?usage: build_expert_gemm_selftest.sh OUTPUT_BINARY}
: "${CUTLASS_DIR:?set CUTLASS_DIR to cutlass_library/source (has include/ and tools/util/include/)}"
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
NVCC=${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
OBJ=$(mktemp -d "${TMPDIR:-/tmp}/expert_gemm_selftest.XXXXXX")

FLAGS=(-std=c++20 -O3 --expt-relaxed-constexpr --expt-extended-lambda -DMOELORA_WITH_CUDA
       -gencode=arch=compute_80,code=sm_80 -gencode=arch=compute_90a,code=sm_90a
       -I"$CUTLASS_DIR/include" -I"$CUTLASS_DIR/tools/util/include")

SRCS=(csrc/cuda/expert_gemm_sm90_bf16.cu csrc/cuda/expert_gemm_sm90_fp16.cu csrc/cuda/expert_gemm_sm90_swap.cu
      csrc/cuda/expert_gemm_sm90_pingpong.cu csrc/cuda/expert_gemm_sm90.cu tools/expert_gemm_sm90_selftest.cu)
pids=()
for src in "${SRCS[@]}"; do
  obj="$OBJ/$(basename "${src%.cu}").o"
  ( start=$(date +%s)
    "$NVCC" "${FLAGS[@]}" -c "$ROOT/$src" -o "$obj" > "$obj.log" 2>&1 || { cat "$obj.log"; echo "FAILED: $src"; exit 1; }
    grep -v "^$" "$obj.log" || true
    echo "compiled $src in $(( $(date +%s) - start )) s" ) &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
[ $status -eq 0 ] || { echo "build failed"; exit 1; }

"$NVCC" -gencode=arch=compute_80,code=sm_80 -gencode=arch=compute_90a,code=sm_90a "$OBJ"/*.o -o "$OUT_BIN"
echo "linked $OUT_BIN"

# The sm_90a kernels must really use wgmma (HGMMA in SASS), not an empty arch-guarded body.
CUOBJDUMP=$(command -v cuobjdump || echo "$(dirname "$NVCC")/cuobjdump")
if [ -x "$CUOBJDUMP" ]; then
  for dt in bf16 fp16; do
    n=$("$CUOBJDUMP" --dump-sass "$OBJ/expert_gemm_sm90_$dt.o" | grep -c HGMMA || true)
    echo "HGMMA instructions in expert_gemm_sm90_$dt.o: $n"
    [ "$n" -gt 0 ] || { echo "no HGMMA in $dt: sm_90a CUTLASS kernels missing"; exit 1; }
  done
fi
rm -rf "$OBJ"
