#!/usr/bin/env bash
# Compile-check every csrc/cuda/*.cu with nvcc for sm_90a (compile only, no link, no GPU needed), two files
# at a time, with the same defines and include dirs as the real build. Fails if any file fails.
#   usage: tools/check_cuda_compiles.sh [python]     (python with torch; default: python3)
# CUTLASS comes from $CUTLASS_DIR or the nvidia-cutlass wheel installed for that python.
# Env: NVCC (default: nvcc on PATH, else /usr/local/cuda/bin/nvcc), JOBS (default 2), OUT_DIR (objects/logs).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${1:-python3}
JOBS=${JOBS:-2}
NVCC=${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
[[ -x $NVCC ]] || { echo "check_cuda_compiles: nvcc not found (set NVCC or install the CUDA toolkit)" >&2; exit 1; }

shopt -s nullglob
files=(csrc/cuda/*.cu csrc/cuda/*.cpp)
if (( ${#files[@]} == 0 )); then
  echo "check_cuda_compiles: no csrc/cuda/*.cu files"
  exit 0
fi

if [[ -z ${CUTLASS_DIR:-} ]]; then
  CUTLASS_DIR=$("$PY" -c "from importlib.metadata import distribution
print(distribution('nvidia-cutlass').locate_file('cutlass_library/source'))" 2>/dev/null || true)
fi
[[ -f $CUTLASS_DIR/include/cutlass/cutlass.h ]] || {
  echo "check_cuda_compiles: CUTLASS headers not found (pip install nvidia-cutlass==4.2.0.0 or set CUTLASS_DIR)" >&2
  exit 1
}

includes=()
while IFS= read -r dir; do includes+=("-I$dir"); done < <("$PY" -c "
import sysconfig
from torch.utils.cpp_extension import include_paths
for p in include_paths(): print(p)
print(sysconfig.get_paths()['include'])")
abi=$("$PY" -c 'import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))')

OUT_DIR=${OUT_DIR:-$(mktemp -d -t moelora_cuda_check.XXXXXX)}
mkdir -p "$OUT_DIR"

# A CPU-only torch wheel ships the c10/cuda headers but not the one its CMake generates for CUDA builds;
# supply that one-line header (as a CUDA build of torch has it) so files using ATen/cuda compile here too.
if ! "$PY" -c "import os, torch, sys; sys.exit(not os.path.exists(os.path.join(os.path.dirname(torch.__file__),
    'include/c10/cuda/impl/cuda_cmake_macros.h')))"; then
  mkdir -p "$OUT_DIR/shim/c10/cuda/impl"
  printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' > "$OUT_DIR/shim/c10/cuda/impl/cuda_cmake_macros.h"
  includes+=("-I$OUT_DIR/shim")
fi
export NVCC OUT_DIR
export NVCC_FLAGS="-std=c++20 -O3 --expt-relaxed-constexpr --expt-extended-lambda -lineinfo \
-gencode=arch=compute_90a,code=sm_90a -Xcompiler -fPIC -D_GLIBCXX_USE_CXX11_ABI=$abi \
-DMOELORA_WITH_CUDA -DCUTLASS_ENABLE_TENSOR_CORE_MMA=1 -I$CUTLASS_DIR/include -I$CUTLASS_DIR/tools/util/include \
${includes[*]}"

compile_one() {
  local src=$1 name
  name=$(basename "$src" .cu)
  local start=$SECONDS
  # shellcheck disable=SC2086
  if "$NVCC" $NVCC_FLAGS -c "$src" -o "$OUT_DIR/$name.o" > "$OUT_DIR/$name.log" 2>&1; then
    echo "ok    $src ($((SECONDS - start))s)"
  else
    echo "FAIL  $src ($((SECONDS - start))s):"
    grep -E "error|Error" "$OUT_DIR/$name.log" | head -40 | sed 's/^/      /'
    return 1
  fi
}
export -f compile_one

echo "check_cuda_compiles: ${#files[@]} files, $JOBS at a time, $($NVCC --version | tail -1), logs in $OUT_DIR"
if printf '%s\n' "${files[@]}" | xargs -P "$JOBS" -I{} bash -c 'compile_one "$@"' _ {}; then
  echo "check_cuda_compiles: all ${#files[@]} files compile"
else
  echo "check_cuda_compiles: some files failed to compile (see above and $OUT_DIR/*.log)" >&2
  exit 1
fi
