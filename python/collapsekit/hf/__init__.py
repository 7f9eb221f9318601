"""collapsekit.hf: transformers integration (transformers is an optional dependency, extra ``hf``).

``patch(model, ...)`` / ``unpatch(model)`` / ``state_norms(model)``: transformers' Mamba / Mamba-2
models on collapsekit (docs/hf.md); ``collect_lm``: the Linguistic-Collapse pipeline.
"""
from .lm import collect_lm
from .patching import patch, state_norms, unpatch

__all__ = ["patch", "unpatch", "state_norms", "collect_lm"]
