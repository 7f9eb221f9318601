"""One module per op family: validation, torch.library registration, backend dispatch."""
from .class_sums import class_means, class_sums

__all__ = ["class_sums", "class_means"]
