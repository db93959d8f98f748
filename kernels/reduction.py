"""Host-side helpers of the fused KD losses, shared by the Triton backend and the fused
linear loss (pure torch: importing this module does not import triton).

Kept here, below both ``pycompress.kernels`` and ``pycompress.ops``, so that the
kernels never import the op registrations (``pycompress.ops`` imports the kernels).
"""

import torch


def reduction_scale(reduction: str, target, ignore_index: int, n_rows: int, batch: int, device) -> torch.Tensor:
    """1 / the reduction's denominator over all rows, as a float64 device scalar (no host sync).

    The contract of :func:`pycompress.kd_loss` (the CPU kernel's ``setup_loss``): ``none``
    and ``sum`` divide by 1, ``mean`` by the valid rows, ``batchmean`` by
    ``n_valid * batch / n_rows``; 0 when no row is valid. Shared by the Triton backend
    and the fused linear loss, which reduce on the host side of their kernels.
    """
    if reduction in ("none", "sum"):
        return torch.ones((), dtype=torch.float64, device=device)
    n_valid = (target != ignore_index).sum() if target is not None else torch.tensor(n_rows, device=device)
    denom = n_valid.to(torch.float64)
    if reduction == "batchmean" and n_rows:
        denom = denom * (batch / n_rows)
    return torch.where(denom > 0, 1.0 / denom.clamp_min(1e-300), 0.0)


def is_concrete(x: torch.Tensor) -> bool:
    """True when x is a real tensor whose values may be read. Traced values (dynamo,
    fake, functional or functorch-wrapped tensors) cannot be inspected."""
    if torch.compiler.is_compiling() or type(x) is not torch.Tensor:
        return False
    return not torch._C._functorch.is_functorch_wrapped_tensor(x)
