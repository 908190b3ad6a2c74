"""Multi-octave simplex noise (AnoDDPM, THOR, pDDPM), vectorised in torch for CPU and GPU.

The noise generator of the reference implementations is KdotJPG's OpenSimplex as
packaged by ``opensimplex`` (AnoDDPM ships a numba fork of it).  This module
implements the same gradient-noise algorithm -- the same skew constants, lattice
gradients, kernel ``(2 - |d|^2)^4`` and the permutation table derived from the
seed by the same 64-bit LCG -- so that one octave at a given seed equals
``opensimplex.OpenSimplex(seed).noise2array`` / ``noise3array`` to float precision
(``noise2_grid`` / ``noise3_grid``).

How it is vectorised
--------------------
A noise value is a sum, over a few lattice vertices near the point, of
``kernel(d) * (g_v . d)`` where ``g_v`` is the gradient the permutation assigns
to vertex ``v``.  Only ``g_v`` depends on the seed; which vertices contribute and
with which weights depends only on the sampling grid.  So for a given grid
(image size, octaves, persistence, frequency, depth) the whole multi-octave
field is a fixed sparse linear map ``A`` applied to the vector of gradients of
the referenced lattice vertices:  ``field = A @ g(seed)``.  ``A`` is built once
in float64 on the CPU (cached) and moved to the device; each call then hashes
the lattice vertices through every field's permutation (small integer
gradients, exact in float32) and does one sparse-dense product for the whole
batch.  Float32 results therefore agree with the float64 reference to ~1e-7.

* 2-D: OpenSimplex-2D is continuous -- every vertex whose kernel reaches the
  point contributes -- so the 8 candidate vertices around the skewed cell are
  summed (the out-of-range ones have zero kernel).
* 3-D: the reference picks 8 vertices per point by a case analysis of the
  skewed cell (tetrahedron at the origin, at (1,1,1), or the octahedron between)
  and occasionally leaves out a vertex whose kernel is still (slightly) positive,
  a small discontinuity of the original algorithm (up to ~1e-4).  To agree with
  it exactly, the same selection rules are reproduced here.

Octaves (AnoDDPM ``rand_2d_octaves`` / ``rand_3d_fixed_T_octaves``)
-------------------------------------------------------------------
``noise = sum_k persistence**k * S(x / f_k, y / f_k [, depth / f_k])`` with
``f_k = frequency / 2**k`` (``frequency`` is the starting feature size in pixels)
and integer pixel coordinates ``x`` (column) and ``y`` (row).  Defaults as in all
reference code: octaves 6, persistence 0.8, frequency 64.  The same permutation
serves all octaves of a field.  ``variant="3d"`` samples the 3-D noise on the
plane at ``depth`` (AnoDDPM's default, which avoids the directional artefacts of
the 2-D variant); ``variant="2d"`` is pDDPM's.  The reference passes the current
timestep as the depth, but since it reseeds for every field the depth has no
statistical effect (AnoDDPM issue #10); a fixed ``depth`` (``DEFAULT_DEPTH``)
is used here so that the sampling operator can be cached.

Registered noise kinds (``uad.noise.make_noise``): ``"simplex"`` = 3-D fixed-depth
variant (AnoDDPM, THOR), ``"simplex2d"`` = 2-D variant (pDDPM); options
``normalise`` and ``frequency`` (below) pass through ``make_noise(..., **options)``.

One field per image
-------------------
``simplex_noise(rng, (C, H, W))`` draws, for every batch item and channel, a
seed from that item's generator (``BatchRNG.integers``), so items get
independent fields and a result never depends on the batch composition.  (The
reference code draws one field and repeats it over the batch.)

Amplitude and frequency (as the reference code, by default)
-----------------------------------------------------------
The reference fields are *not* unit variance: the octave sum has std about
0.33-0.53 for the 3-D variant and 0.44-0.66 for the 2-D one (methods.md section
2.1), and the noise levels of the papers (AnoDDPM lambda = 250, THOR L = 250,
pDDPM t = 499) were chosen with that amplitude.  ``normalise="none"`` (the
default) keeps it, so those levels destroy as much signal here as there.
``normalise="unit"`` rescales every field to zero mean and unit std over its
H x W pixels (then the SNR of a level equals the Gaussian one).  Same
signal-to-noise ratio sqrt(ab)/(std sqrt(1 - ab)), measured std 0.475 (3-D) /
0.565 (2-D) at 64 px: AnoDDPM's lambda = 250 and THOR's simplex L = 250 with
reference fields equal t = 131-132 with unit fields (linear schedule); pDDPM's
t = 499 (cosine) equals t = 324 with unit fields, and t = 499 with unit fields
acts like t = 672 with reference fields.  So with this default the presets'
levels (250, 250, 499) mean what they mean in the papers; models trained with
unit fields (``LEGACY_OPTIONS``, e.g. the bundled pddpm-t2-phantom) destroy
more signal at the same level.

``frequency`` is the starting feature size in pixels (64 in every reference
config, at 128 px for THOR).  ``frequency="scaled"`` (the default of
``simplex_noise``) scales it with the field size: ``64 * min(H, W) / 128`` (32
at 64 px, 64 at 128 px, 128 at 256 px), so that the noise blobs cover the same
anatomy whatever the model resolution; a number fixes it.

Models record their choice in the config key ``noise_options``
(``uad.zoo.Model.noise_options``); model configs without the key were trained
before this fix, with unit-std fields at a fixed 64-px feature size
(``LEGACY_OPTIONS``), and keep being served with exactly that.
"""

from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np
import torch

from .noise import register_noise
from .rng import BatchRNG

# -- constants of the OpenSimplex algorithm (values as in the reference) ------------------------
STRETCH2 = -0.211324865405187  # (1/sqrt(3) - 1) / 2
SQUISH2 = 0.366025403784439  # (sqrt(3) - 1) / 2
STRETCH3 = -1.0 / 6.0  # (1/sqrt(4) - 1) / 3
SQUISH3 = 1.0 / 3.0  # (sqrt(4) - 1) / 3
NORM2 = 47.0
NORM3 = 103.0

# 2-D gradients: 8 directions towards the vertices of an octagon.
GRADIENTS2 = np.array([
    [5, 2], [2, 5], [-5, 2], [-2, 5],
    [5, -2], [2, -5], [-5, -2], [-2, -5],
], dtype=np.int64)

# 3-D gradients: 24 directions towards the vertices of a (skewed) rhombicuboctahedron.
GRADIENTS3 = np.array([
    [-11, 4, 4], [-4, 11, 4], [-4, 4, 11],
    [11, 4, 4], [4, 11, 4], [4, 4, 11],
    [-11, -4, 4], [-4, -11, 4], [-4, -4, 11],
    [11, -4, 4], [4, -11, 4], [4, -4, 11],
    [-11, 4, -4], [-4, 11, -4], [-4, 4, -11],
    [11, 4, -4], [4, 11, -4], [4, 4, -11],
    [-11, -4, -4], [-4, -11, -4], [-4, -4, -11],
    [11, -4, -4], [4, -11, -4], [4, -4, -11],
], dtype=np.int64)

DEFAULT_OCTAVES = 6
DEFAULT_PERSISTENCE = 0.8
DEFAULT_FREQUENCY = 64.0
DEFAULT_VARIANT = "3d"
DEFAULT_DEPTH = 1000.0  # the depth THOR's trainer uses; any fixed value is statistically equivalent
DEFAULT_NORMALISE = "none"  # the reference amplitude
REFERENCE_SIZE = 128  # the image size at which the reference feature size (64 px) applies
DEFAULT_SCALED_FREQUENCY = "scaled"
LEGACY_OPTIONS = {"normalise": "unit", "frequency": DEFAULT_FREQUENCY}  # models trained before the fix
SEED_HIGH = 2 ** 62  # seeds are drawn in [0, SEED_HIGH)

_MASK64 = (1 << 64) - 1
_LCG_MUL = np.uint64(6364136223846793005)
_LCG_ADD = np.uint64(1442695040888963407)


# -- permutation tables -------------------------------------------------------------------------
def permutation_tables(seeds: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """The permutation of 0..255 and the 3-D gradient index table of each seed.

    Same derivation as the reference: a 64-bit LCG (multiplier
    6364136223846793005, increment 1442695040888963407) advanced three times,
    then once per entry of a Fisher-Yates-style draw ``r = (state + 31) mod (i+1)``
    with the state read as a signed 64-bit integer.  Vectorised over seeds.
    Returns ``perm`` (N, 256) and ``grad3`` (N, 256) = ``perm % 24`` (a row of
    ``GRADIENTS3``; the reference stores 3 times that as a flat index).
    """
    seeds = [int(s) & _MASK64 for s in seeds]
    n = len(seeds)
    if n < 8:  # a plain Python loop is faster than the vectorised one for a few seeds
        perm = np.array([_permutation_py(s) for s in seeds], dtype=np.int64).reshape(n, 256)
        return perm, perm % 24
    state = np.array(seeds, dtype=np.uint64)
    perm = np.empty((n, 256), dtype=np.int64)
    source = np.tile(np.arange(256, dtype=np.int64), (n, 1))
    rows = np.arange(n)
    with np.errstate(over="ignore"):
        for _ in range(3):
            state = state * _LCG_MUL + _LCG_ADD
        for i in range(255, -1, -1):
            state = state * _LCG_MUL + _LCG_ADD
            m = i + 1
            r = ((state.view(np.int64) % m) + 31) % m  # == (signed_state + 31) mod m, Python semantics
            perm[:, i] = source[rows, r]
            source[rows, r] = source[:, i]
    return perm, perm % 24


def _permutation_py(seed: int) -> list[int]:
    mul, add = int(_LCG_MUL), int(_LCG_ADD)
    state = seed & _MASK64
    for _ in range(3):
        state = (state * mul + add) & _MASK64
    source = list(range(256))
    perm = [0] * 256
    for i in range(255, -1, -1):
        state = (state * mul + add) & _MASK64
        signed = state - (1 << 64) if state >> 63 else state
        r = (signed + 31) % (i + 1)
        perm[i] = source[r]
        source[r] = source[i]
    return perm


# -- geometry: which lattice vertices contribute to a point, with which weights ------------------
_CAND2 = np.array([[0, 0], [1, 0], [0, 1], [1, 1], [2, 0], [0, 2], [1, -1], [-1, 1]], dtype=np.int64)


def _stencil2(px: np.ndarray, py: np.ndarray):
    """Contributions for 2-D points: (point index (E,), vertex (E, 2) int64, weights (E, 2))."""
    px = np.asarray(px, np.float64).ravel()
    py = np.asarray(py, np.float64).ravel()
    off = (px + py) * STRETCH2
    sbx, sby = np.floor(px + off), np.floor(py + off)
    sq = (sbx + sby) * SQUISH2
    d0x, d0y = px - (sbx + sq), py - (sby + sq)
    idx, verts, ws = [], [], []
    for ox, oy in _CAND2:
        s = (ox + oy) * SQUISH2
        dx, dy = d0x - ox - s, d0y - oy - s
        attn = 2.0 - dx * dx - dy * dy
        keep = np.nonzero(attn > 0)[0]
        a2 = attn[keep] * attn[keep]
        a4 = a2 * a2 / NORM2
        idx.append(keep)
        verts.append(np.stack([sbx[keep] + ox, sby[keep] + oy], 1).astype(np.int64))
        ws.append(np.stack([a4 * dx[keep], a4 * dy[keep]], 1))
    return np.concatenate(idx), np.concatenate(verts), np.concatenate(ws)


def _bits(c, k):
    return (c & k) != 0


def _ext_vertices3(xi, yi, zi):
    """The two 'extra' vertices the reference adds to the cell's simplex (offsets (P, 3) each)
    and the region of every point (0: tetrahedron at the origin, 1: at (1,1,1), 2: octahedron)."""
    p = xi.shape[0]
    in_sum = xi + yi + zi
    region = np.where(in_sum <= 1, 0, np.where(in_sum >= 2, 1, 2))
    e0 = np.zeros((p, 3), np.int64)
    e1 = np.zeros((p, 3), np.int64)

    # Region 0: choose the two closest of (1,0,0)=1, (0,1,0)=2, (0,0,1)=4.
    m = region == 0
    if m.any():
        x, y, z = xi[m], yi[m], zi[m]
        a_sc, b_sc = x.copy(), y.copy()
        a_pt, b_pt = np.full(x.shape, 1), np.full(x.shape, 2)
        c1 = (a_sc >= b_sc) & (z > b_sc)
        c2 = ~c1 & (a_sc < b_sc) & (z > a_sc)
        b_sc, b_pt = np.where(c1, z, b_sc), np.where(c1, 4, b_pt)
        a_sc, a_pt = np.where(c2, z, a_sc), np.where(c2, 4, a_pt)
        wins = 1 - (x + y + z)
        near0 = (wins > a_sc) | (wins > b_sc)
        # (0,0,0) among the two closest: extras from the other closest vertex c
        c = np.where(b_sc > a_sc, b_pt, a_pt)
        bx, by, bz = _bits(c, 1), _bits(c, 2), _bits(c, 4)
        n0 = np.stack([np.where(bx, 1, -1), np.where(by, 1, np.where(bx, -1, 0)), np.where(bz, 1, 0)], 1)
        n1 = np.stack([np.where(bx, 1, 0), np.where(by, 1, np.where(bx, 0, -1)), np.where(bz, 1, -1)], 1)
        # otherwise: extras from the union of the two closest
        c = a_pt | b_pt
        bits = np.stack([_bits(c, 1), _bits(c, 2), _bits(c, 4)], 1)
        f0 = np.where(bits, 1, 0)
        f1 = np.where(bits, 1, -1)
        e0[m] = np.where(near0[:, None], n0, f0)
        e1[m] = np.where(near0[:, None], n1, f1)

    # Region 1: choose the two closest of (1,1,0)=3, (1,0,1)=5, (0,1,1)=6.
    m = region == 1
    if m.any():
        x, y, z = xi[m], yi[m], zi[m]
        a_sc, b_sc = x.copy(), y.copy()
        a_pt, b_pt = np.full(x.shape, 6), np.full(x.shape, 5)
        c1 = (a_sc <= b_sc) & (z < b_sc)
        c2 = ~c1 & (a_sc > b_sc) & (z < a_sc)
        b_sc, b_pt = np.where(c1, z, b_sc), np.where(c1, 3, b_pt)
        a_sc, a_pt = np.where(c2, z, a_sc), np.where(c2, 3, a_pt)
        wins = 3 - (x + y + z)
        near1 = (wins < a_sc) | (wins < b_sc)
        c = np.where(b_sc < a_sc, b_pt, a_pt)
        bx, by, bz = _bits(c, 1), _bits(c, 2), _bits(c, 4)
        n0 = np.stack([np.where(bx, 2, 0), np.where(by, np.where(bx, 1, 2), 0), np.where(bz, 1, 0)], 1)
        n1 = np.stack([np.where(bx, 1, 0), np.where(by, np.where(bx, 2, 1), 0), np.where(bz, 2, 0)], 1)
        c = a_pt & b_pt
        bits = np.stack([_bits(c, 1), _bits(c, 2), _bits(c, 4)], 1)
        f0 = np.where(bits, 1, 0)
        f1 = np.where(bits, 2, 0)
        e0[m] = np.where(near1[:, None], n0, f0)
        e1[m] = np.where(near1[:, None], n1, f1)

    # Region 2 (octahedron): two closest among the six vertices, each on the near or far side.
    m = region == 2
    if m.any():
        x, y, z = xi[m], yi[m], zi[m]
        p1, p2, p3 = x + y, x + z, y + z
        a_far, b_far, far3 = p1 > 1, p2 > 1, p3 > 1
        a_sc = np.where(a_far, p1 - 1, 1 - p1)
        b_sc = np.where(b_far, p2 - 1, 1 - p2)
        sc3 = np.where(far3, p3 - 1, 1 - p3)
        a_pt = np.where(a_far, 3, 4)
        b_pt = np.where(b_far, 5, 2)
        pt3 = np.where(far3, 6, 1)
        ca = (a_sc <= b_sc) & (a_sc < sc3)
        cb = ~ca & (a_sc > b_sc) & (b_sc < sc3)
        a_pt, a_far = np.where(ca, pt3, a_pt), np.where(ca, far3, a_far)
        b_pt, b_far = np.where(cb, pt3, b_pt), np.where(cb, far3, b_far)

        def flip_one(c):  # the permutation of (1,1,-1) whose -1 sits on the first axis missing from c
            out = np.ones(c.shape + (3,), np.int64)
            nx, ny = ~_bits(c, 1), ~_bits(c, 2)
            out[nx, 0] = -1
            out[~nx & ny, 1] = -1
            out[~nx & ~ny, 2] = -1
            return out

        def two_on(c):  # 2 on the first axis present in c
            out = np.zeros(c.shape + (3,), np.int64)
            hx, hy = _bits(c, 1), _bits(c, 2)
            out[hx, 0] = 2
            out[~hx & hy, 1] = 2
            out[~hx & ~hy, 2] = 2
            return out

        same = a_far == b_far
        both_far = same & a_far
        both_near = same & ~a_far
        r0 = np.zeros((x.shape[0], 3), np.int64)
        r1 = np.zeros((x.shape[0], 3), np.int64)
        r0[both_far] = 1
        r1[both_far] = two_on(a_pt & b_pt)[both_far]
        r1[both_near] = flip_one(a_pt | b_pt)[both_near]  # r0 stays (0,0,0)
        mixed = ~same
        c_far = np.where(a_far, a_pt, b_pt)
        c_near = np.where(a_far, b_pt, a_pt)
        r0[mixed] = flip_one(c_far)[mixed]
        r1[mixed] = two_on(c_near)[mixed]
        e0[m] = r0
        e1[m] = r1
    return region, e0, e1


_BASE3 = {
    0: np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], np.int64),
    1: np.array([[1, 1, 0], [1, 0, 1], [0, 1, 1], [1, 1, 1]], np.int64),
    2: np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [1, 0, 1], [0, 1, 1]], np.int64),
}


def _stencil3(px, py, pz):
    """Contributions for 3-D points: (point index (E,), vertex (E, 3) int64, weights (E, 3))."""
    px = np.asarray(px, np.float64).ravel()
    py = np.asarray(py, np.float64).ravel()
    pz = np.asarray(pz, np.float64).ravel()
    off = (px + py + pz) * STRETCH3
    xs, ys, zs = px + off, py + off, pz + off
    sb = np.stack([np.floor(xs), np.floor(ys), np.floor(zs)], 1)
    sq = (sb[:, 0] + sb[:, 1] + sb[:, 2]) * SQUISH3
    d0 = np.stack([px - (sb[:, 0] + sq), py - (sb[:, 1] + sq), pz - (sb[:, 2] + sq)], 1)
    region, e0, e1 = _ext_vertices3(xs - sb[:, 0], ys - sb[:, 1], zs - sb[:, 2])

    pts, offs = [], []
    for r, base in _BASE3.items():
        sel = np.nonzero(region == r)[0]
        for o in base:
            pts.append(sel)
            offs.append(np.broadcast_to(o, (sel.size, 3)))
    allp = np.arange(px.size)
    pts += [allp, allp]
    offs += [e0, e1]
    pts = np.concatenate(pts)
    offs = np.concatenate(offs).astype(np.int64)

    s = offs.sum(1) * SQUISH3
    d = (d0[pts] - offs) - s[:, None]
    attn = 2.0 - d[:, 0] * d[:, 0] - d[:, 1] * d[:, 1] - d[:, 2] * d[:, 2]
    keep = attn > 0
    a2 = attn[keep] * attn[keep]
    a4 = a2 * a2 / NORM3
    verts = sb[pts[keep]].astype(np.int64) + offs[keep]
    return pts[keep], verts, a4[:, None] * d[keep]


# -- the sampling operator ---------------------------------------------------------------------
class _Operator:
    """field (P points) = A (P x L*dim) @ gradients of the L referenced lattice vertices."""

    def __init__(self, dim: int, n_points: int, idx: np.ndarray, verts: np.ndarray, w: np.ndarray):
        self.dim = dim
        self.n_points = n_points
        # unique vertices via one integer key per vertex (much faster than np.unique(axis=0))
        lo = verts.min(0)
        span = verts.max(0) - lo + 1
        key = np.zeros(verts.shape[0], np.int64)
        for k in range(dim):
            key = key * span[k] + (verts[:, k] - lo[k])
        ukey, inv = np.unique(key, return_inverse=True)
        inv = np.asarray(inv).ravel()
        uniq = np.empty((ukey.size, dim), np.int64)
        rest = ukey.copy()
        for k in range(dim - 1, -1, -1):
            uniq[:, k] = rest % span[k] + lo[k]
            rest //= span[k]
        self.vertices = uniq  # (L, dim) int64
        rows = np.repeat(idx, dim)
        cols = (inv[:, None] * dim + np.arange(dim)[None, :]).ravel()
        self.rows, self.cols, self.vals = rows, cols, w.ravel()
        self._dev: dict = {}

    @property
    def n_vertices(self) -> int:
        return int(self.vertices.shape[0])

    def on(self, device: torch.device, dtype: torch.dtype):
        key = (str(device), dtype)
        if key not in self._dev:
            ind = torch.from_numpy(np.stack([self.rows, self.cols]))
            a = torch.sparse_coo_tensor(ind, torch.from_numpy(self.vals),
                                        (self.n_points, self.n_vertices * self.dim),
                                        check_invariants=False).coalesce()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
                a = a.to(dtype).to_sparse_csr().to(device)
            v = torch.from_numpy(self.vertices).to(device)
            self._dev[key] = (a, v)
        return self._dev[key]

    def apply(self, seeds: Sequence[int], device="cpu", dtype=torch.float32) -> torch.Tensor:
        """(N, P) fields for N seeds."""
        device = torch.device(device)
        if device.type not in ("cpu", "cuda"):  # e.g. MPS has no sparse CSR product: compute on the CPU
            return self.apply(seeds, "cpu", dtype).to(device)
        if dtype not in (torch.float32, torch.float64):  # half precision: compute in float32, then cast
            return self.apply(seeds, device, torch.float32).to(dtype)
        a, v = self.on(device, dtype)
        perm_np, g3_np = permutation_tables(seeds)
        perm = torch.from_numpy(perm_np).to(device)
        n = perm.shape[0]
        h = perm[:, v[:, 0] & 255]  # (N, L)
        h = torch.gather(perm, 1, (h + v[:, 1]) & 255)
        if self.dim == 2:
            gi = (h & 0x0E) >> 1
            table = torch.from_numpy(GRADIENTS2).to(device, dtype)
        else:
            g3 = torch.from_numpy(g3_np).to(device)
            gi = torch.gather(g3, 1, (h + v[:, 2]) & 255)
            table = torch.from_numpy(GRADIENTS3).to(device, dtype)
        grads = table[gi]  # (N, L, dim)
        g = grads.reshape(n, -1).T.contiguous()  # (L*dim, N)
        out = torch.sparse.mm(a, g) if a.layout != torch.strided else a @ g
        return out.T.contiguous()


_CACHE: dict = {}
_CACHE_MAX = 16


def _octave_operator(height: int, width: int, octaves: int, persistence: float, frequency: float,
                     variant: str, depth: float) -> _Operator:
    key = (int(height), int(width), int(octaves), float(persistence), float(frequency), variant,
           float(depth) if variant == "3d" else None)
    op = _CACHE.get(key)
    if op is not None:
        return op
    y = np.arange(height, dtype=np.float64)
    x = np.arange(width, dtype=np.float64)
    idx, verts, ws = [], [], []
    f = float(frequency)
    amp = 1.0
    for _ in range(int(octaves)):
        gy, gx = np.meshgrid(y / f, x / f, indexing="ij")
        if variant == "2d":
            i, v, w = _stencil2(gx, gy)
        elif variant == "3d":
            i, v, w = _stencil3(gx, gy, np.full(gx.shape, float(depth) / f))
        else:
            raise ValueError(f"simplex variant must be '2d' or '3d', got {variant!r}")
        idx.append(i)
        verts.append(v)
        ws.append(w * amp)
        f /= 2.0
        amp *= persistence
    op = _Operator(2 if variant == "2d" else 3, height * width, np.concatenate(idx), np.concatenate(verts),
                   np.concatenate(ws))
    if len(_CACHE) >= _CACHE_MAX:
        _CACHE.pop(next(iter(_CACHE)))
    _CACHE[key] = op
    return op


# -- public API ----------------------------------------------------------------------------------
def noise2_grid(x, y, seeds: Sequence[int], device="cpu", dtype=torch.float32) -> torch.Tensor:
    """One octave of 2-D noise on the grid x (columns) by y (rows): (N, len(y), len(x)).

    Equals ``opensimplex.OpenSimplex(seed).noise2array(x, y)`` for each seed.
    """
    x = np.asarray(x, np.float64).ravel()
    y = np.asarray(y, np.float64).ravel()
    gy, gx = np.meshgrid(y, x, indexing="ij")
    op = _Operator(2, gx.size, *_stencil2(gx, gy))
    return op.apply(seeds, device, dtype).reshape(len(seeds), y.size, x.size)


def noise3_grid(x, y, z: float, seeds: Sequence[int], device="cpu", dtype=torch.float32) -> torch.Tensor:
    """One octave of 3-D noise on the plane at depth z: (N, len(y), len(x)).

    Equals ``opensimplex.OpenSimplex(seed).noise3array(x, y, np.array([z]))[0]`` for each seed.
    """
    x = np.asarray(x, np.float64).ravel()
    y = np.asarray(y, np.float64).ravel()
    gy, gx = np.meshgrid(y, x, indexing="ij")
    op = _Operator(3, gx.size, *_stencil3(gx, gy, np.full(gx.shape, float(z))))
    return op.apply(seeds, device, dtype).reshape(len(seeds), y.size, x.size)


def octave_noise(seeds: Sequence[int], height: int, width: int, octaves: int = DEFAULT_OCTAVES,
                 persistence: float = DEFAULT_PERSISTENCE, frequency: float = DEFAULT_FREQUENCY,
                 variant: str = DEFAULT_VARIANT, depth: float = DEFAULT_DEPTH, device="cpu",
                 dtype=torch.float32) -> torch.Tensor:
    """Raw multi-octave fields, one per seed: (N, height, width), not normalised.

    Equals AnoDDPM's ``rand_3d_fixed_T_octaves(shape, depth, ...)`` (variant "3d") or
    ``rand_2d_octaves(shape, ...)`` (variant "2d") of an ``OpenSimplex(seed)``.
    """
    if octaves < 1:
        raise ValueError("octaves must be >= 1")
    if frequency <= 0:
        raise ValueError("frequency (starting feature size in pixels) must be > 0")
    op = _octave_operator(height, width, octaves, persistence, frequency, variant, depth)
    return op.apply(list(seeds), device, dtype).reshape(len(seeds), height, width)


def resolve_frequency(frequency, height: int, width: int) -> float:
    """The starting feature size in px: a number as is, ``"scaled"`` = 64 * min(H, W) / 128."""
    if isinstance(frequency, str):
        if frequency != "scaled":
            raise ValueError(f"simplex frequency must be a number of pixels or 'scaled', got {frequency!r}")
        return DEFAULT_FREQUENCY * min(int(height), int(width)) / REFERENCE_SIZE
    f = float(frequency)
    if not f > 0:
        raise ValueError("frequency (starting feature size in pixels) must be > 0")
    return f


def normalise_fields(fields: torch.Tensor, mode: str = DEFAULT_NORMALISE) -> torch.Tensor:
    """``"unit"``: zero mean and unit std over the last two dims of every field; ``"none"``: as is."""
    if mode in ("none", None, False):
        return fields
    if mode == "unit":
        mean = fields.mean(dim=(-2, -1), keepdim=True)
        std = fields.std(dim=(-2, -1), keepdim=True, unbiased=False)
        return (fields - mean) / std.clamp_min(1e-12)
    raise ValueError(f"normalise must be 'unit' or 'none', got {mode!r}")


@register_noise("simplex")
def simplex_noise(rng: BatchRNG, shape: Sequence[int], octaves: int = DEFAULT_OCTAVES,
                  persistence: float = DEFAULT_PERSISTENCE, frequency="scaled",
                  variant: str = DEFAULT_VARIANT, depth: float = DEFAULT_DEPTH,
                  normalise: str = DEFAULT_NORMALISE, dtype=torch.float32) -> torch.Tensor:
    """Simplex noise of shape (B, C, H, W) (``shape`` = (C, H, W) or (H, W)), on ``rng.device``.

    Defaults as the reference code: raw amplitude (``normalise="none"``) and a
    feature size of 64 px at 128 px (``frequency="scaled"``); see the module doc.

    Every item and channel gets its own field, seeded from the item's generator
    (C seeds drawn in channel order), so items are independent and the result
    of an item does not depend on the batch.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) == 2:
        shape = (1,) + shape
    if len(shape) != 3:
        raise ValueError(f"simplex noise needs a (C, H, W) or (H, W) shape, got {shape}")
    c, h, w = shape
    frequency = resolve_frequency(frequency, h, w)
    if normalise not in ("none", "unit", None, False):
        raise ValueError(f"normalise must be 'unit' or 'none', got {normalise!r}")
    per_channel = [rng.integers(SEED_HIGH) for _ in range(c)]  # c lists of B seeds
    seeds = [per_channel[j][b] for b in range(len(rng)) for j in range(c)]
    if not seeds:
        return torch.zeros((0, c, h, w), device=rng.device, dtype=dtype)
    fields = octave_noise(seeds, h, w, octaves, persistence, frequency, variant, depth, rng.device, dtype)
    fields = normalise_fields(fields, normalise)
    return fields.reshape(len(rng), c, h, w)


@register_noise("simplex2d")
def simplex2d_noise(rng: BatchRNG, shape: Sequence[int], **options) -> torch.Tensor:
    """The 2-D octave variant (pDDPM's training and test noise), otherwise as ``simplex_noise``."""
    return simplex_noise(rng, shape, variant="2d", **options)


__all__ = [
    "simplex2d_noise",
    "simplex_noise", "octave_noise", "noise2_grid", "noise3_grid", "normalise_fields", "permutation_tables",
    "DEFAULT_DEPTH", "DEFAULT_OCTAVES", "DEFAULT_PERSISTENCE", "DEFAULT_FREQUENCY", "DEFAULT_VARIANT",
    "DEFAULT_NORMALISE", "LEGACY_OPTIONS", "REFERENCE_SIZE", "resolve_frequency",
]

