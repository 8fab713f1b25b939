"""The one confidence-interval helper: mean and the half-width of a normal 95% interval,
``1.96 x sample std / sqrt(n)`` over the values present (NaN means "absent"), used by dataset
traces and evaluations alike."""

from __future__ import annotations

import torch
from torch import Tensor

Z95 = 1.96


def mean_ci95(values: Tensor, dim: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Mean, 95% half-width and count of the non-NaN entries of ``values`` along ``dim``.

    The mean is NaN where no value is present, the half-width where fewer than two are (the
    sample variance divides by ``n - 1``).

    >>> import torch
    >>> mean, half, n = mean_ci95(torch.tensor([[1.0, float("nan")], [3.0, 2.0]]))
    >>> mean.tolist(), n.tolist()
    ([2.0, 2.0], [2, 1])
    >>> round(half[0].item(), 4), half[1].isnan().item()   # 1.96 * sqrt(2) / sqrt(2)
    (1.96, True)
    """
    values = values.double()
    present = ~torch.isnan(values)
    n = present.sum(dim)
    safe_n = n.clamp(min=1)
    mu = torch.nansum(values, dim) / safe_n
    dev = torch.where(present, values - mu.unsqueeze(dim), torch.zeros_like(values))
    var = (dev ** 2).sum(dim) / (n - 1).clamp(min=1)
    mean = torch.where(n > 0, mu, torch.nan)
    half = torch.where(n > 1, Z95 * (var / safe_n).sqrt(), torch.nan)
    return mean, half, n


def mean_ci95_list(values: list[float]) -> tuple[float, float]:
    """:func:`mean_ci95` of a list of numbers, as floats (NaN, NaN for an empty list)."""
    if not values:
        return float("nan"), float("nan")
    mean, half, _ = mean_ci95(torch.tensor(values, dtype=torch.float64))
    return float(mean), float(half)
