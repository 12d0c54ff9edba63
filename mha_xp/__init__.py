"""mha_xp: multi-head attention written once against the Python array API standard.

One implementation, dispatched with ``array-api-compat``, runs on NumPy,
CuPy, PyTorch, JAX, array-api-strict and any other compliant library, and
returns arrays of the caller's library, on the caller's device, in the
caller's dtype.
"""

from ._attention import scaled_dot_product_attention
from ._layer import MultiHeadAttention

__version__ = "0.1.0"

__all__ = ["MultiHeadAttention", "__version__", "scaled_dot_product_attention"]
