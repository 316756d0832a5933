"""LoRA adapters for the moelora op: slot pool, adapter formats (PEFT, TRT-LLM), validation."""
from .pool import LoraPool, PoolFullError, attach_lora_pool, get_lora_pool, use_adapters
from .validation import AdapterValidationError

__all__ = ["LoraPool", "PoolFullError", "AdapterValidationError", "attach_lora_pool", "get_lora_pool",
           "use_adapters"]
