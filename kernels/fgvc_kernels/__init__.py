"""fgvc_kernels: fused ops for fine-grained recognition models, usable without the fgvc package.

    from fgvc_kernels import bilinear_pool, BilinearPool

Needs only torch; on CUDA, Triton kernels run when Triton is installed, and an exact torch path runs everywhere else.
The reference composition the op must equal is `fgvc_kernels.testing.bilinear_pool_naive`.
"""

from fgvc_kernels.bilinear import SQRT_MODES, BilinearPool, bilinear_pool

__all__ = ["SQRT_MODES", "BilinearPool", "bilinear_pool"]
