"""mha_xp: multi-head attention written once against the Python array API standard.

One implementation, dispatched with ``array-api-compat``, runs on NumPy,
CuPy, PyTorch, JAX, Dask, array-api-strict and any other compliant library, and
returns arrays of the caller's library, on the caller's device, in the
caller's dtype.
"""

from ._attention import (
    attention_vjp,
    attention_with_lse,
    merge_attention,
    scaled_dot_product_attention,
)
from ._blocks import BlockMask, create_block_mask
from ._statistics import attention_statistics
from ._model._cache import KVCache
from ._config import (
    DEFAULT_MEMORY_BUDGET,
    get_memory_budget,
    get_native_kernels,
    get_num_threads,
    memory_budget,
    native_kernels,
    num_threads,
)
from ._io import load_weights, save_weights
from ._layer import MultiHeadAttention
from ._attention import alibi_slopes
from ._model._qk_norm import qk_norm, qk_norm_vjp
from ._model._rope import rope_frequencies
from ._model._rotary import apply_rotary

__version__ = "0.1.0"

__all__ = [
    "BlockMask",
    "DEFAULT_MEMORY_BUDGET",
    "KVCache",
    "MultiHeadAttention",
    "__version__",
    "alibi_slopes",
    "apply_rotary",
    "attention_statistics",
    "attention_vjp",
    "attention_with_lse",
    "create_block_mask",
    "get_memory_budget",
    "get_native_kernels",
    "get_num_threads",
    "load_weights",
    "memory_budget",
    "merge_attention",
    "native_kernels",
    "num_threads",
    "qk_norm",
    "qk_norm_vjp",
    "rope_frequencies",
    "save_weights",
    "scaled_dot_product_attention",
]
