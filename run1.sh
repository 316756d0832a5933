#!/bin/bash
export MOELORA_GIT_REV=$(cat .rev 2>/dev/null)
bash scripts/device_run.sh build > $OUT/run.log 2>&1; tail -3 $OUT/run.log
timeout 230 python3 -m pytest -q -p no:cacheprovider tests/test_fused_moe_cuda.py -k "token_rows or fc2_gemm or fused_activation or graph_replay or pdl or row_paths or matches_reference" > $OUT/t1.log 2>&1; tail -15 $OUT/t1.log | cut -c1-300
timeout 250 python3 benchmarks/profile_stages.py --iters 10 --shapes qwen3-30b-a3b,mixtral-8x7b,gpt-oss-20b --tokens 256,1024,4096 --variant new= --variant old=MOELORA_LORA_TOKEN_ROWS=0,MOELORA_LORA_FC2_ACCUMULATE=0 --variant tok=MOELORA_LORA_FC2_ACCUMULATE=0 --json $OUT/p1.json > $OUT/p1.log 2>&1; grep -v "^    " $OUT/p1.log | head -120
