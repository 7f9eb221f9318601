"""collapsekit.hf: transformers integration (transformers is an optional dependency)."""
from .lm import collect_lm
