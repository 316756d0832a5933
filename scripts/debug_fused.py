import os, sys, torch
sys.path.insert(0, "tests")
from test_fused_moe_cuda import make_case, poison_allocator
import moelora_ext
from moelora_ext.reference import fused_moe_reference
for shape, dtype in [((700, 512, 256, 16, 4, 3, 32), torch.float16), ((700, 512, 256, 16, 4, 3, 32), torch.bfloat16),
                     ((300, 256, 192, 32, 4, 8, 8), torch.float16)]:
    T, H, I, E, k, S, R = shape
    args = make_case(T, H, I, E, k, S, R, dtype=dtype, seed=41)
    ref = fused_moe_reference(**args).float()
    for rows in ["0", "64", "16"]:
        os.environ["MOELORA_LORA_FEW_ROWS"] = rows
        outs = {}
        for f in ["1", "0", "1b", "0b"]:
            os.environ["MOELORA_LORA_FUSED_ACT"] = f[0]
            poison_allocator()
            outs[f] = moelora_ext.fused_moe(**args).float()
        d = (outs["1"] - outs["0"]).abs()
        bad = (d > 0).nonzero()
        print(shape, dtype, "rows", rows, "ndiff", int((d > 0).sum()), "maxdiff", float(d.max()),
              "err fused", float((outs["1"] - ref).norm() / ref.norm()), "err unfused", float((outs["0"] - ref).norm() / ref.norm()),
              "rep diffs", int((outs["1"] != outs["1b"]).sum()), int((outs["0"] != outs["0b"]).sum()), "bad tokens", bad[:, 0].unique()[:10].tolist(), flush=True)
