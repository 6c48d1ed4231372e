"""Is this code being traced? The one place gptfn asks torch's private corners.

Three questions, each answered by calls that ``torch.compile`` traces without a graph break
(tested in tests/test_tracing.py):

- :func:`transform_depth` / :func:`inside_transform`: how many torch.func transforms (grad, vjp,
  vmap, jvp) are active around this call.
- :func:`needs_math_sdpa`: whether the fused attention kernels cannot serve this call (anything
  but a single ``grad``/``vjp``).
- :func:`is_traced`: whether a tensor is a transform's wrapper or ``torch.compile`` is tracing,
  so its values cannot be read.

The private imports are guarded: if a torch release moves them, these functions answer as if
no transform were active and ``import gptfn`` keeps working.
"""

from __future__ import annotations

import torch
from torch import Tensor

try:
    from torch._C._functorch import TransformType, get_dynamic_layer_stack_depth
    from torch._C._functorch import is_functorch_wrapped_tensor as _is_wrapped
    from torch._functorch.pyfunctorch import retrieve_current_functorch_interpreter
except ImportError:  # a torch that moved them: behave as if never transformed
    TransformType = None  # type: ignore[assignment,misc]

    def get_dynamic_layer_stack_depth() -> int:
        return 0

    def _is_wrapped(tensor: Tensor) -> bool:
        return False

    def retrieve_current_functorch_interpreter():  # type: ignore[no-redef]
        return None


def is_compiling() -> bool:
    """True while ``torch.compile`` (dynamo) traces the calling code."""
    return torch.compiler.is_compiling()


def transform_depth() -> int:
    """The number of torch.func transforms active around the caller (0 outside any)."""
    return get_dynamic_layer_stack_depth()


def inside_transform() -> bool:
    """True inside any torch.func transform (grad, vjp, vmap, jvp, ...)."""
    return transform_depth() > 0


def plain_eager(*tensors: Tensor | None) -> bool:
    """Eager, outside torch.func transforms, with none of ``tensors`` to differentiate: where a
    custom kernel without a derivative or a batching rule may run."""
    if is_compiling() or inside_transform():
        return False
    grad = torch.is_grad_enabled()
    return not (grad and any(t is not None and t.requires_grad for t in tensors))


def needs_math_sdpa() -> bool:
    """True under any torch.func transform but a single ``grad``/``vjp``: the fused CPU attention
    kernels have no batching rule (vmap would loop), no forward-mode AD (jvp) and no double
    backward, so SDPA must use its math backend there."""
    depth = transform_depth()
    if depth == 0:
        return False
    if depth >= 2 or TransformType is None:
        return True
    return retrieve_current_functorch_interpreter().key() != TransformType.Grad


def is_traced(tensor: Tensor) -> bool:
    """True for a tensor wrapped by a torch.func transform, or anything under ``torch.compile``:
    its values cannot be read (``int(x.max())`` fails inside vmap and breaks a compiled graph)."""
    return is_compiling() or _is_wrapped(tensor)
