"""collapsekit: fast measurement and shaping of collapse in neural networks.

Ops (see docs/design.md / docs/): class_sums, class_means, ...; every op takes
``backend="auto" | "reference" | "cpp" | "triton"``.
"""
from . import reference
from . import nn
from .accumulator import CollapseAccumulator, collapse_metrics
from .etf import etf_error, nearest_etf, simplex_etf
from .ops.class_sums import class_means, class_sums
from .ops.etf_logits import etf_logits
from .ops.nearest_center import nearest_class_center
from .ops.ssd_scan import ssd_scan
from .ops.selective_scan import selective_scan
from .ops.within_class import within_class_covariance, within_class_variance

__version__ = "0.1.0"

__all__ = ["CollapseAccumulator", "collapse_metrics", "class_sums", "class_means", "within_class_variance",
           "within_class_covariance", "nearest_class_center", "simplex_etf", "nearest_etf", "etf_error", "etf_logits",
           "selective_scan", "ssd_scan", "nn", "reference", "__version__"]
