"""collapsekit.hf: transformers' Mamba / Mamba-2 models on collapsekit (optional extra ``hf``).

``patch(model, ...)`` / ``unpatch(model)`` / ``state_norms(model)``; see docs/hf.md.
"""
from .patching import patch, state_norms, unpatch

__all__ = ["patch", "unpatch", "state_norms"]
