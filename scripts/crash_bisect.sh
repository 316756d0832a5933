#!/usr/bin/env bash
# Device-only diagnosis of the direct-op bad-input crash: CPU-only build first (fast), then the full build.
set -uo pipefail
OUT=${OUT:-/tmp/moelora_out}; mkdir -p "$OUT"
export MAX_JOBS=16 PYTHONUNBUFFERED=1
cat > /tmp/g.py <<'PY'
import sys; sys.path.insert(0, "tests")
import torch, moelora_ext
from test_validation import BAD_INPUTS, good, op_positional
name, mutate, match = [b for b in BAD_INPUTS if b[0] == "hidden_1d"][0]
dev = sys.argv[1]
pos, kw = op_positional(mutate(good(dev)))
try:
    torch.ops.moelora.fused_moe(*pos, **kw)
except RuntimeError as e:
    print("RAISED", dev, str(e)[:100])
PY
gdbbt() { timeout 120 cuda-gdb -q -batch -ex "set print frame-arguments none" -ex run -ex "bt 14" --args python3 /tmp/g.py "$1" 2>&1 | grep -E "^#|signal" | cut -c1-260; }
echo "== cpu-only build"
MOELORA_CPU_ONLY=1 python3 -m pip install --no-build-isolation --no-deps -e . > "$OUT/build_cpu.log" 2>&1 || tail -20 "$OUT/build_cpu.log"
python3 /tmp/g.py cpu; echo "rc=$?"
gdbbt cpu
python3 -m zipfile -e .whl/nvidia_cutlass-4.2.0.0-py3-none-any.whl /tmp/cutlass
export CUTLASS_DIR=/tmp/cutlass/cutlass_library/source
echo "== full build"
rm -rf build
python3 -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 || { grep -E "error" "$OUT/build.log" | head -30; }
for d in cpu cuda; do python3 /tmp/g.py $d; echo "rc=$?"; done
gdbbt cuda
