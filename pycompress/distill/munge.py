"""Transfer-set generators (Buciluǎ et al. 2006) and teacher labelling.

``munge`` is the paper's generator for continuous attributes, vectorised:

    for each pass over the data, for each example e with nearest neighbour e'
    (Euclidean, itself excluded), and for each attribute a (value a in e, b in e'):
        with probability p:  e_a <- N(b, (|a - b| / s)^2)
        otherwise:           e_a <- a

Difference from the paper's sequential loop: there, e' is modified in the same
step (its attribute becomes N(a, ...)) and later examples see the modified
copy. Here every pass starts from the training data and only e changes, so
each pass is one batched operation; a transfer set of size m takes
``ceil(m / N)`` passes, truncated to m.

``noise_mixup`` is the image generator: random pairs ``(x_i, x_j)`` mixed as
``lam x_i + (1 - lam) x_j``, ``lam ~ Beta(mix_alpha, mix_alpha)``, plus Gaussian
pixel noise of std ``noise_std``.
"""

import math
from typing import Callable, Optional

import torch
from torch.utils.data import Dataset, TensorDataset

__all__ = ["munge", "noise_mixup", "make_transfer_set", "label_with_teacher", "nearest_neighbours",
           "stack_inputs"]


def stack_inputs(data: Dataset) -> torch.Tensor:
    """The inputs (first element of each item) of ``data`` as one tensor ``(N, ...)``."""
    if isinstance(data, TensorDataset):
        return data.tensors[0]
    return torch.stack([torch.as_tensor(data[i][0]) for i in range(len(data))])


def nearest_neighbours(x: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """Index of each row's nearest other row of ``x (Tensor[N, D])`` in Euclidean distance.

    Ties go to the lower index. Works in ``chunk``-row blocks to bound memory to
    ``chunk * N`` distances.
    """
    if x.dim() != 2 or x.shape[0] < 2:
        raise ValueError(f"x must be (N, D) with N >= 2, got shape {tuple(x.shape)}")
    out = torch.empty(x.shape[0], dtype=torch.long)
    xf = x.double()
    for start in range(0, x.shape[0], chunk):
        d = torch.cdist(xf[start:start + chunk], xf)
        rows = torch.arange(d.shape[0])
        d[rows, rows + start] = math.inf  # an example is not its own neighbour
        out[start:start + chunk] = d.argmin(1)
    return out


def munge(x: torch.Tensor, size: int, p: float = 0.5, s: float = 10.0,
          generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """MUNGE on continuous attributes: ``size`` synthetic rows from ``x (Tensor[N, D])``.

    Args:
        x (Tensor[N, D]): training inputs, N >= 2.
        size (int): number of rows to generate, >= 0.
        p (float): probability of swapping each attribute with the neighbour's value.
        s (float): the swapped value gets Gaussian noise of std ``|a - b| / s``.
        generator (torch.Generator, optional): source of randomness.

    Returns:
        Tensor[size, D]: the transfer set, ``x.dtype``.
    """
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise ValueError(f"size must be an int >= 0, got {size!r}")
    nn_idx = nearest_neighbours(x)
    a, b = x, x[nn_idx]
    spread = (a - b).abs() / s
    passes = []
    for _ in range(math.ceil(size / x.shape[0])):
        swap = torch.rand(a.shape, generator=generator) < p
        noisy_b = b + spread * torch.randn(a.shape, generator=generator)
        passes.append(torch.where(swap, noisy_b, a))
    return torch.cat(passes)[:size] if passes else x.new_empty((0, x.shape[1]))


def noise_mixup(x: torch.Tensor, size: int, noise_std: float = 0.05, mix_alpha: float = 1.0,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """``size`` mixed and noised copies of random pairs of ``x (Tensor[N, ...])``."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise ValueError(f"size must be an int >= 0, got {size!r}")
    n = x.shape[0]
    i = torch.randint(n, (size,), generator=generator)
    j = torch.randint(n, (size,), generator=generator)
    # Beta(a, a) from two Gammas, drawn from `generator` (torch.distributions has no generator argument)
    ga = torch._standard_gamma(torch.full((size,), float(mix_alpha)), generator=generator)
    gb = torch._standard_gamma(torch.full((size,), float(mix_alpha)), generator=generator)
    lam = (ga / (ga + gb)).to(x.dtype).view(-1, *([1] * (x.dim() - 1)))
    mixed = lam * x[i] + (1 - lam) * x[j]
    return mixed + noise_std * torch.randn(mixed.shape, generator=generator, dtype=x.dtype)


def make_transfer_set(x: torch.Tensor, size: int, kind: str, *, p: float = 0.5, s: float = 10.0,
                      noise_std: float = 0.05, mix_alpha: float = 1.0,
                      generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """A transfer set of ``size`` inputs shaped like ``x``'s rows: ``kind`` is ``munge`` or ``mixup``.

    ``munge`` runs on the inputs flattened to vectors and reshapes back.
    """
    if kind == "munge":
        return munge(x.reshape(x.shape[0], -1), size, p=p, s=s, generator=generator).reshape(size, *x.shape[1:])
    if kind == "mixup":
        return noise_mixup(x, size, noise_std=noise_std, mix_alpha=mix_alpha, generator=generator)
    raise ValueError(f"kind must be 'munge' or 'mixup', got {kind!r}")


@torch.no_grad()
def label_with_teacher(teacher_fn: Callable, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """``teacher_fn`` on every row of ``x``, in ``batch_size`` chunks, as float32 on the CPU."""
    out = []
    for start in range(0, x.shape[0], batch_size):
        out.append(teacher_fn(x[start:start + batch_size]).float().cpu())
    return torch.cat(out)
