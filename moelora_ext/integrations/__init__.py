"""Integrations of the moelora op with model libraries (transformers 5 experts interface)."""
from .layout import expert_weights, experts_layout, is_experts_module

__all__ = ["register_transformers_experts", "experts_layout", "expert_weights", "is_experts_module"]


def register_transformers_experts() -> bool:
    """Register "moelora" in transformers' ExpertsInterface. Returns False when transformers is missing."""
    from .transformers import register
    try:
        register()  # imports transformers
    except ImportError:
        return False
    return True
