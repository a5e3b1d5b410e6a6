"""Small float64 synthetic data for solver tests: correlated inputs, a weight, LinearStats."""
from __future__ import annotations

import torch

from lrinfer.offline.calibration import LinearStats


def inputs(n: int, d: int, seed: int = 0, outliers: bool = True) -> torch.Tensor:
    """X [n, d] with correlated channels and a few large-magnitude channels (like LLM activations)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g, dtype=torch.float64) / d ** 0.5 + torch.eye(d, dtype=torch.float64)
    X = torch.randn(n, d, generator=g, dtype=torch.float64) @ mix
    if outliers:
        X[:, : max(1, d // 8)] *= 8.0
    return X


def weight(out: int, d: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out, d, generator=g, dtype=torch.float64) / d ** 0.5


def stats_from(X: torch.Tensor, X_hat: torch.Tensor | None = None, name: str = "lin") -> LinearStats:
    """All input statistics of one linear from dense inputs X [N, in] (and compressed-path X̂)."""
    X_hat = X if X_hat is None else X_hat
    return LinearStats(name, n=X.shape[0], gram=X.t() @ X, gram_hat=X_hat.t() @ X_hat, cross=X.t() @ X_hat,
                       abs_sum=X.abs().sum(0))
