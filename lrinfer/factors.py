"""`FactorPair`: the low-rank form of one linear layer.

Convention (one place): a dense `nn.Linear` weight W is [out, in] and y = x Wᵀ + b.
A factorization stores U [out, k] and V [in, k] with W ≈ U Vᵀ, so y = (x V) Uᵀ + b.
Solvers split singular values evenly: U = U_r Σ^{1/2}, V = (Σ^{1/2} V_rᵀ ·(un-whitening))ᵀ.
ResSVD adds a residual pair U2 [out, k2], V2 [in, k2]: W ≈ U Vᵀ + U2 V2ᵀ.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import LrinferError


@dataclass
class FactorPair:
    U: torch.Tensor                    # [out, k]
    V: torch.Tensor                    # [in, k]
    U2: torch.Tensor | None = None     # [out, k2]
    V2: torch.Tensor | None = None     # [in, k2]

    def __post_init__(self):
        if self.U.ndim != 2 or self.V.ndim != 2 or self.U.shape[1] != self.V.shape[1]:
            raise ValueError(f"FactorPair: U {tuple(self.U.shape)} and V {tuple(self.V.shape)} "
                             "must be [out, k] and [in, k]")
        if (self.U2 is None) != (self.V2 is None):
            raise ValueError("FactorPair: give both U2 and V2, or neither")
        if self.U2 is not None and (self.U2.shape[0] != self.U.shape[0] or self.V2.shape[0] != self.V.shape[0]
                                    or self.U2.shape[1] != self.V2.shape[1]):
            raise ValueError(f"FactorPair: residual U2 {tuple(self.U2.shape)} / V2 {tuple(self.V2.shape)} "
                             f"do not match U {tuple(self.U.shape)} / V {tuple(self.V.shape)}")

    @property
    def out_features(self) -> int:
        return self.U.shape[0]

    @property
    def in_features(self) -> int:
        return self.V.shape[0]

    @property
    def rank(self) -> int:
        return self.U.shape[1]

    @property
    def rank2(self) -> int:
        return 0 if self.U2 is None else self.U2.shape[1]

    @property
    def num_params(self) -> int:
        return (self.rank + self.rank2) * (self.in_features + self.out_features)

    def dense(self) -> torch.Tensor:
        """W = U Vᵀ [+ U2 V2ᵀ], [out, in]."""
        W = self.U @ self.V.t()
        if self.U2 is not None:
            W = W + self.U2 @ self.V2.t()
        return W

    def balanced(self) -> "FactorPair":
        """The same product with each rank column scaled so that ‖U[:, i]‖ = ‖V[:, i]‖.

        Whitened solvers fold M⁻ᵀ into V, so raw factors can be badly scaled (one side ~N^¼ times
        the other for N calibration tokens, far more on near-dead channels); balanced factors keep
        float16/bfloat16 activations of x V and the products in range. Exact up to rounding.
        """
        def bal(U, V):
            nu, nv = U.norm(dim=0), V.norm(dim=0)
            ok = (nu > 0) & (nv > 0)
            c = torch.where(ok, (nv / torch.where(ok, nu, 1)).sqrt(), torch.ones_like(nu))
            return U * c, V / c
        if self.U2 is None:
            return FactorPair(*bal(self.U, self.V))
        return FactorPair(*bal(self.U, self.V), *bal(self.U2, self.V2))

    def to(self, *args, **kwargs) -> "FactorPair":
        f = lambda t: None if t is None else t.to(*args, **kwargs)  # noqa: E731
        return FactorPair(f(self.U), f(self.V), f(self.U2), f(self.V2))

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensors by the names `LowRankLinear` gives its parameters."""
        out = {"U": self.U, "V": self.V}
        if self.U2 is not None:
            out.update(U2=self.U2, V2=self.V2)
        return out


def flatten_factors(factors: dict[str, "FactorPair"]) -> dict[str, torch.Tensor]:
    """{name: FactorPair} -> {"name.U": U, "name.V": V, ...}, the names a state dict uses."""
    return {f"{n}.{k}": v for n, p in factors.items() for k, v in p.tensors().items()}


def unflatten_factors(tensors: dict[str, torch.Tensor]) -> dict[str, "FactorPair"]:
    """The inverse of `flatten_factors`."""
    names = {k.rsplit(".", 1)[0] for k in tensors}
    return {n: FactorPair(tensors[f"{n}.U"], tensors[f"{n}.V"], tensors.get(f"{n}.U2"), tensors.get(f"{n}.V2"))
            for n in names}


def check_ratio(ratio: float, what: str = "ratio") -> float:
    """`ratio` as a float, or a one-line error unless 0 < ratio < 1."""
    if not isinstance(ratio, (int, float)) or not 0.0 < ratio < 1.0:
        raise LrinferError(f"{what} must be strictly between 0 and 1 (the fraction of the linears' "
                           f"parameters removed, e.g. 0.2); got {ratio}")
    return float(ratio)


def rank_for_ratio(in_features: int, out_features: int, ratio: float, multiple: int = 1) -> int:
    """Rank k with k·(in+out) ≈ (1−ratio)·in·out, rounded to the nearest `multiple`, within [1, min(in, out)].

    `ratio` is the fraction of the layer's parameters removed, 0 < ratio < 1. With multiple=1 this is
    SVD-LLM's ⌊(1−ratio)·in·out/(in+out)⌋. Rounding to the nearest multiple (not down) keeps the
    achieved ratio close to the target across many layers; a rank never drops below
    min(multiple, min(in, out)).
    """
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"ratio must be in (0, 1) (the fraction of parameters removed); got {ratio}")
    if multiple < 1:
        raise ValueError(f"rank multiple must be >= 1; got {multiple}")
    full = min(in_features, out_features)
    exact = (1.0 - ratio) * in_features * out_features / (in_features + out_features)
    k = int(exact) if multiple == 1 else int(exact / multiple + 0.5) * multiple
    return max(min(k, full), min(multiple, full), 1)
