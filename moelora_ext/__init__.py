"""moelora_ext: a fused mixture-of-experts MLP with per-token multi-LoRA adapters, as the PyTorch custom op
``torch.ops.moelora.fused_moe`` (CPU kernel in C++, CUDA kernels where built).

    import moelora_ext
    out = moelora_ext.fused_moe(hidden_states, w13, w2, topk_weights, topk_ids)

See ``moelora_ext.fused_moe`` for the arguments and ``moelora_ext.fused_moe_reference`` for the math.
"""
import torch  # noqa: F401  (first: _C links against torch's shared libraries)

from . import _C  # noqa: F401  (loading the shared library registers torch.ops.moelora.*)
from .ops import fused_moe
from .reference import fused_moe_reference

__all__ = ["fused_moe", "fused_moe_reference"]

# --- Adapter pool and integrations (issue 4) --------------------------------------------------------------
# Other parts of the package add their public names here, e.g.
#   from .adapters import attach_lora_pool
#   __all__ += ["attach_lora_pool"]
from .adapters import LoraPool, PoolFullError, attach_lora_pool, use_adapters  # noqa: E402
from .integrations import register_transformers_experts as _register_transformers_experts  # noqa: E402

_register_transformers_experts()  # "moelora" in transformers' ExpertsInterface (no-op without transformers)
__all__ += ["attach_lora_pool", "use_adapters", "LoraPool", "PoolFullError"]
# --- end of adapter exports -------------------------------------------------------------------------------
