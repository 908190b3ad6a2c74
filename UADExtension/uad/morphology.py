"""Batched 2-D image filters on torch tensors (grey morphology, Gaussian blur).

Every function takes a (B, C, H, W) tensor and filters each image and channel
on its own (never across the batch axis, unlike ``scipy.ndimage`` applied to a
4-D array), on the tensor's device.  Boundary handling follows
``scipy.ndimage``:

* ``gaussian_blur``: ``mode='reflect'`` (half-sample symmetric, d c b a | a b c d),
  radius ``int(truncate * sigma + 0.5)`` as ``scipy.ndimage.gaussian_filter``;
* grey dilation / erosion / closing with a flat square footprint of odd size k:
  ``mode='nearest'`` (edge replication), as ``scipy.ndimage.grey_*(size=(k, k), mode='nearest')``.

``scaled_kernel`` converts a kernel size given at one resolution (the papers
work at 128 x 128 px) to the resolution of the model.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "scaled_kernel", "gaussian_kernel1d", "gaussian_blur", "grey_dilation", "grey_erosion",
    "grey_closing", "grey_opening", "binary_dilation",
]


def scaled_kernel(size_at_ref: int, image_size: int, ref_size: int = 128, minimum: int = 1) -> int:
    """An odd kernel size covering the same field of view as ``size_at_ref`` px at ``ref_size`` px.

    ``k = 2 * floor(size_at_ref * image_size / (2 * ref_size)) + 1``, at least ``minimum``
    (made odd).  13 px at 128 -> 3 at 32, 7 at 64, 9 at 96, 13 at 128, 27 at 256;
    3 px at 128 -> 1 at 32..84, 3 at 128, 7 at 256.
    """
    k = 2 * int(math.floor(size_at_ref * image_size / (2.0 * ref_size))) + 1
    m = int(minimum)
    if m % 2 == 0:
        m += 1
    return max(k, m)


def _check4d(x: torch.Tensor) -> None:
    if x.ndim != 4:
        raise ValueError(f"expected a (B, C, H, W) tensor, got shape {tuple(x.shape)}")


def _symmetric_index(n: int, pad: int, device) -> torch.Tensor:
    """Indices of a half-sample symmetric extension of length n by ``pad`` on both sides."""
    i = torch.arange(-pad, n + pad, device=device)
    j = torch.remainder(i, 2 * n)
    return torch.where(j >= n, 2 * n - 1 - j, j)


def _pad_symmetric(x: torch.Tensor, pad: int) -> torch.Tensor:
    """scipy 'reflect' padding of the two last axes (works for any pad, even > size)."""
    if pad <= 0:
        return x
    h, w = x.shape[-2:]
    x = x.index_select(-2, _symmetric_index(h, pad, x.device))
    return x.index_select(-1, _symmetric_index(w, pad, x.device))


def gaussian_kernel1d(sigma: float, truncate: float = 4.0, device=None, dtype=torch.float32) -> torch.Tensor:
    """Normalised 1-D Gaussian taps, radius ``int(truncate * sigma + 0.5)`` (as scipy)."""
    radius = int(truncate * float(sigma) + 0.5)
    xs = torch.arange(-radius, radius + 1, device=device, dtype=torch.float64)
    k = torch.exp(-0.5 * (xs / float(sigma)) ** 2)
    return (k / k.sum()).to(dtype)


def gaussian_blur(x: torch.Tensor, sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """Separable Gaussian blur of every image (and channel) separately, scipy 'reflect' borders."""
    _check4d(x)
    if sigma <= 0:
        return x.clone()
    b, c, h, w = x.shape
    k = gaussian_kernel1d(sigma, truncate, x.device, x.dtype)
    r = (k.numel() - 1) // 2
    y = _pad_symmetric(x.reshape(b * c, 1, h, w), r)
    y = F.conv2d(y, k.view(1, 1, -1, 1))
    y = F.conv2d(y, k.view(1, 1, 1, -1))
    return y.reshape(b, c, h, w)


def _max_filter(x: torch.Tensor, size: int) -> torch.Tensor:
    size = int(size)
    if size < 1:
        raise ValueError(f"kernel size must be >= 1, got {size}")
    if size == 1:
        return x.clone()
    lo, hi = size // 2, size - 1 - size // 2  # centred for odd sizes (the ones used here)
    y = F.pad(x, (lo, hi, lo, hi), mode="replicate")
    return F.max_pool2d(y, kernel_size=size, stride=1)


def grey_dilation(x: torch.Tensor, size: int) -> torch.Tensor:
    """Grey dilation with a flat ``size`` x ``size`` square (a running maximum), 'nearest' borders."""
    _check4d(x)
    return _max_filter(x, size)


def grey_erosion(x: torch.Tensor, size: int) -> torch.Tensor:
    """Grey erosion with a flat ``size`` x ``size`` square (a running minimum), 'nearest' borders."""
    _check4d(x)
    return -_max_filter(-x, size)


def grey_closing(x: torch.Tensor, size: int) -> torch.Tensor:
    """Dilation followed by erosion (fills dark gaps narrower than the square)."""
    return grey_erosion(grey_dilation(x, size), size)


def grey_opening(x: torch.Tensor, size: int) -> torch.Tensor:
    """Erosion followed by dilation (removes bright specks narrower than the square)."""
    return grey_dilation(grey_erosion(x, size), size)


def binary_dilation(mask: torch.Tensor, size: int = 3) -> torch.Tensor:
    """Dilation of a boolean (B, C, H, W) mask with a ``size`` x ``size`` square (cv2.dilate, 1 iteration)."""
    _check4d(mask)
    return _max_filter(mask.to(torch.float32), size) > 0.5
