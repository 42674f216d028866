"""Bicubic resize of a position table, as PyTorch's `F.interpolate(mode="bicubic", align_corners=False)`
computes it (Qwen-VL resizes its 16x16 position grids to the patch grid this way).

PyTorch's kernel differs from `jax.image.resize`: cubic coefficient a = -0.75 (not -0.5), no antialiasing,
and at the borders the four taps are clamped to the edge sample (the source position itself is not). The
resize is separable, so it is two small matmuls with constant matrices.
"""

import jax
import jax.numpy as jnp
import numpy as np

_A = -0.75


def _cubic_weights(t: float) -> tuple[float, float, float, float]:
    """PyTorch's get_cubic_upsample_coefficients for fraction t of the way from tap 1 to tap 2."""
    def near(x: float) -> float:  # |x| <= 1
        return ((_A + 2) * x - (_A + 3)) * x * x + 1

    def far(x: float) -> float:  # 1 < |x| < 2
        return ((_A * x - 5 * _A) * x + 8 * _A) * x - 4 * _A

    return far(t + 1), near(t), near(1 - t), far(2 - t)


def bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] float32: row i holds the weights of output sample i over the input samples."""
    m = np.zeros((n_out, n_in), np.float64)
    scale = n_in / n_out
    for i in range(n_out):
        real = scale * (i + 0.5) - 0.5
        index = int(np.floor(real))
        t = real - index
        for k, w in enumerate(_cubic_weights(t)):
            m[i, min(max(index + k - 1, 0), n_in - 1)] += w
    return m.astype(np.float32)


def resize_grid(table: jax.Array, size: int, out: int) -> jax.Array:
    """table [size*size, C], a row-major size x size grid -> [out*out, C] on an out x out grid, in fp32
    (Qwen-VL's get_abs_pos); the table itself when the sizes agree."""
    if out == size:
        return table
    m = jnp.asarray(bicubic_matrix(size, out))
    grid = table.astype(jnp.float32).reshape(size, size, -1)
    grid = jnp.einsum("oh,hwc->owc", m, grid, precision=jax.lax.Precision.HIGHEST)
    grid = jnp.einsum("pw,owc->opc", m, grid, precision=jax.lax.Precision.HIGHEST)
    return grid.reshape(out * out, -1).astype(table.dtype)
