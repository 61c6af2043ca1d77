"""The best grid point: the true optimum of ``min_x f(Q(x))`` over the points a scale-from-the-row quantizer ``Q`` can
output (docs/results.md, the quadratics section).

``Q(x) = t * v`` for a scale ``t > 0`` and a code vector ``v`` (in the rotated basis for ``quest``); ``v`` is reachable
iff its rounding box holds a point of the norm the scale rule fixes (``max|u| = 7`` for absmax, ``||u||_2 = sqrt(d) *
15 / (2 alpha_4)`` for the RMS rules). Exact by enumeration at d <= 6; at kappa 1 by a scan over ``t`` (exact when the
best candidate is reachable).
"""

from __future__ import annotations

import math

from .problems import Run, weight_spec


def grid_geometry(spec, d: int):
    """``(values, lo, hi, norm, target)`` of a scale-from-the-row grid, in units of its step: the code values,
    each value's rounding interval ``[lo, hi]`` (infinite at clamped codes), and the norm (``"linf"`` / ``"l2"``)
    the scale rule fixes for ``u = x / step`` at ``target``."""
    import torch

    inf = math.inf
    if spec.group_size is not None or spec.bits != 4:
        raise ValueError("the best grid point is computed for 4-bit per-row grids only")
    if spec.grid == "int" and spec.scale_rule == "absmax":
        values = torch.arange(-7.0, 8.0, dtype=torch.float64)
        return values, (values - 0.5).clamp_min(-7), (values + 0.5).clamp_max(7), "linf", 7.0
    if spec.scale_rule != "mse":
        raise ValueError(f"scale rule {spec.scale_rule!r} is not covered here; use absmax or mse")
    target = math.sqrt(d) * 15 / (2 * spec.clip_alpha)
    if spec.grid == "int":
        values = torch.arange(-8.0, 8.0, dtype=torch.float64)
    elif spec.grid == "quest":
        values = torch.arange(-7.5, 8.0, dtype=torch.float64)
    else:
        raise ValueError(f"grid {spec.grid!r} is not covered here")
    lo, hi = values - 0.5, values + 0.5
    lo[0], hi[-1] = -inf, inf
    return values, lo, hi, "l2", target


def reachable(idx, geometry):
    """Which code vectors (rows of indices into ``values``) some ``x`` rounds to (module docstring)."""
    import torch

    _, lo, hi, norm, target = geometry
    low, high = lo[idx], hi[idx]
    near = torch.where((low <= 0) & (high >= 0), torch.zeros_like(low), torch.minimum(low.abs(), high.abs()))
    far = torch.maximum(low.abs(), high.abs())
    if norm == "linf":
        smallest, largest = near.amax(-1), far.amax(-1)
    else:
        smallest, largest = near.square().sum(-1).sqrt(), far.square().sum(-1).sqrt()
    return (smallest <= target) & (largest >= target)


def rotation(spec, d: int):
    """The grid's rotation as a dense float64 ``(d, d)`` matrix (block-diagonal Hadamard, symmetric), or ``I``."""
    import torch

    from hf_cage import kernels

    if not spec.hadamard_block:
        return torch.eye(d, dtype=torch.float64)
    block = kernels.reference.hadamard_matrix(spec.hadamard_block).double()
    return torch.block_diag(*[block] * (d // spec.hadamard_block))


def best_of(v, a, x_star, geometry):
    """Over candidate code vectors ``v`` (N, d; rotated basis), each at its least-squares scale: the best reachable
    one, ``(f_best, codes_best, scale_best, f_lower_bound, exact)`` (``exact``: the best candidate is reachable)."""
    import torch

    av = v @ a
    num, den = av @ x_star, (av * v).sum(-1)
    f0 = 0.5 * x_star @ a @ x_star
    gain = torch.where(num > 0, 0.5 * num.square() / den.clamp_min(1e-300), torch.zeros_like(num))
    values = geometry[0]
    ok = reachable((v - values[0]).round().long(), geometry)
    best_any = int(gain.argmax())
    best = int(torch.where(ok, gain, torch.full_like(gain, -1.0)).argmax())
    scale = float((num[best] / den[best]).clamp_min(0))
    return float(f0 - gain[best]), v[best], scale, float(f0 - gain[best_any]), bool(ok[best_any])


def best_by_scan(spec, x_star):
    """Best grid point of ``f = 1/2 ||y - x*||^2`` (kappa 1) for one seed, by the scan over scales (module
    docstring): ``(f_best, codes_best, scale_best, f_lower_bound, exact)``, codes in the rotated basis."""
    import torch

    d = x_star.numel()
    geometry = grid_geometry(spec, d)
    values = geometry[0]
    x = rotation(spec, d) @ x_star
    mids = (values[1:] + values[:-1]) / 2
    cuts = (x.view(-1, 1) / mids.view(1, -1)).flatten()
    cuts = torch.unique(cuts[torch.isfinite(cuts) & (cuts > 0)])
    ts = torch.cat([(cuts[1:] + cuts[:-1]) / 2, cuts[:1] / 2, cuts[-1:] * 2])
    index = (x.view(1, -1) / ts.view(-1, 1) - values[0]).round().clamp(0, len(values) - 1)
    return best_of(values[0] + index, torch.eye(d, dtype=torch.float64), x, geometry)


def best_by_enumeration(spec, a, x_star):
    """Best grid point over every code vector (small d), exact: ``(f_best, codes_best, scale_best)``."""
    import itertools

    import torch

    d = x_star.numel()
    geometry = grid_geometry(spec, d)
    values = geometry[0]
    if len(values) ** d > 2**24:
        raise ValueError(f"d={d}: {len(values)}^{d} code vectors is too many to enumerate; use d <= 6")
    v = values[torch.tensor(list(itertools.product(range(len(values)), repeat=d)))]
    rot = rotation(spec, d)
    return best_of(v, rot @ a @ rot, rot @ x_star, geometry)[:3]


def best_points(run: Run, problems, x_final) -> dict:
    """Per seed, where the best grid point is computable (d <= 6, or kappa 1; else ``{}``): ``best`` (its f / f(0)),
    ``best_exact``, ``same_codes`` (``Q(x_T)`` has the best point's codes, at its own scale) and ``dist``
    (``||Q(x_T) - y_best|| / ||y_best||``)."""
    import torch

    from hf_cage import kernels

    if run.kappa != 1 and run.d > 6:
        return {}
    spec = weight_spec(run.quantizer, run.d)
    rot = rotation(spec, run.d)
    codes = kernels.quantize_rows(x_final, spec)[0].double() + spec.code_offset
    q_final = kernels.fake_quantize(x_final, spec)[0].double()
    out = {"best": [], "best_exact": [], "same_codes": [], "dist": []}
    for (a, x_star, _), code, q in zip(problems, codes, q_final):
        f0 = float(0.5 * x_star @ a @ x_star)
        if run.d <= 6:
            (f_best, best_codes, scale), exact = best_by_enumeration(spec, a, x_star), True
        else:
            f_best, best_codes, scale, _, exact = best_by_scan(spec, x_star)
        y = rot @ (best_codes * scale)
        out["best"].append(f_best / f0)
        out["best_exact"].append(exact)
        out["same_codes"].append(bool(torch.equal(code, best_codes)))
        out["dist"].append(float((q - y).norm() / y.norm()))
    return out
