"""Curvature of a scalar function of the parameter tree: Hessian-vector products, the top
Hessian eigenvalues (Lanczos) and Hutchinson's trace estimate.

``hvp`` is forward-over-reverse (``jvp`` of ``grad``). The fused CPU attention kernel has no
forward-mode AD and no double backward; ``gptfn.forward`` switches to SDPA's math backend under
nested transforms, and these functions also run inside ``sdpa_kernel([SDPBackend.MATH])``, so a
user's ``f = lambda p: gptfn.loss(p, tokens, targets)`` works as written.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import optree
import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from gptfn.tree import Tree


def hvp(f: Callable[[Tree], Tensor], params: Tree, v: Tree) -> Tree:
    """Hessian of ``f`` at ``params`` times the tree ``v`` (same structure as ``params``)."""
    with sdpa_kernel([SDPBackend.MATH]):
        return torch.func.jvp(torch.func.grad(f), (params,), (v,))[1]


def _flat_hvp(f: Callable[[Tree], Tensor], params: Tree) -> tuple[Callable[[Tensor], Tensor], int]:
    leaves, spec = optree.tree_flatten(params)
    sizes = [x.numel() for x in leaves]

    def to_tree(vec: Tensor) -> Tree:
        parts = vec.split(sizes)
        return optree.tree_unflatten(spec, [p.view_as(x) for p, x in zip(parts, leaves)])

    def apply(vec: Tensor) -> Tensor:
        return torch.cat([x.reshape(-1) for x in optree.tree_leaves(hvp(f, params, to_tree(vec)))])

    return apply, sum(sizes)


def top_hessian_eigenvalues(
    f: Callable[[Tree], Tensor], params: Tree, k: int = 1, iters: int = 30, seed: int = 0
) -> Tensor:
    """The ``k`` largest (algebraic) eigenvalues of the Hessian of ``f`` at ``params``, by
    Lanczos with full reorthogonalisation.

    Args:
      f: A scalar function of the parameter tree, e.g. ``lambda p: gptfn.loss(p, x, y)``.
      params: The point at which the Hessian is taken.
      k: How many eigenvalues to return.
      iters: Lanczos steps (Hessian-vector products); exact once it reaches the parameter
        count, and usually accurate for the top few well before.
      seed: Seeds the random starting vector.

    Returns:
      A [k] tensor in the params' dtype, descending.
    """
    apply, n = _flat_hvp(f, params)
    dtype = optree.tree_leaves(params)[0].dtype
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(n, generator=gen, dtype=dtype)
    basis = [q / q.norm()]
    alphas, betas = [], []
    for j in range(min(iters, n)):
        w = apply(basis[j])
        alphas.append(torch.dot(w, basis[j]))
        stacked = torch.stack(basis)
        w = w - stacked.T @ (stacked @ w)  # full reorthogonalisation (twice is enough)
        w = w - stacked.T @ (stacked @ w)
        beta = w.norm()
        if j + 1 == min(iters, n) or beta < 1e-10 * abs(float(alphas[0]) + 1e-30):
            break
        betas.append(beta)
        basis.append(w / beta)
    t = torch.diag(torch.stack(alphas))
    if betas:
        off = torch.stack(betas)
        t = t + torch.diag(off, 1) + torch.diag(off, -1)
    return torch.linalg.eigvalsh(t).flip(0)[:k]


def hutchinson_trace(
    f: Callable[[Tree], Tensor], params: Tree, samples: int = 100, seed: int = 0
) -> tuple[float, float]:
    """Hutchinson's estimate of the Hessian trace, E[v^T H v] over Rademacher vectors v.

    Args:
      f: A scalar function of the parameter tree.
      params: The point at which the Hessian is taken.
      samples: Number of random vectors (Hessian-vector products).
      seed: Seeds the random vectors.

    Returns:
      ``(estimate, standard_error)`` as floats.
    """
    apply, n = _flat_hvp(f, params)
    dtype = optree.tree_leaves(params)[0].dtype
    gen = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(samples):
        v = torch.randint(0, 2, (n,), generator=gen).to(dtype) * 2 - 1
        values.append(float(torch.dot(v, apply(v))))
    mean = sum(values) / samples
    var = sum((x - mean) ** 2 for x in values) / max(samples - 1, 1)
    return mean, math.sqrt(var / samples)
