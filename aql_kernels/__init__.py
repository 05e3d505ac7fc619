"""aql_kernels: fused uncertainty scores, a multi-tensor Fisher EMA and an exact top-k selector.

Each op dispatches by the device of its input (CUDA -> Triton / CUDA library, CPU -> the C++ library)
and falls back to its pure-torch reference with a one-time warning when an implementation is missing;
`backends()` says what is available here.
"""

from ._dispatch import Backend, backends
from .fisher import fisher_ema_
from .scores import SoftmaxScores, cross_entropy_with_scores, softmax_scores
from .select import digit_histogram, key_to_float, order_keys, topk_indices, topk_mask, topk_threshold

__all__ = [
    "Backend",
    "SoftmaxScores",
    "backends",
    "cross_entropy_with_scores",
    "digit_histogram",
    "fisher_ema_",
    "key_to_float",
    "order_keys",
    "softmax_scores",
    "topk_indices",
    "topk_mask",
    "topk_threshold",
]
__version__ = "0.1.0"
