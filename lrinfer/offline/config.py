"""`CompressConfig`: everything that decides a compression, and the defaults every caller reads (the
CLI's flags, the memory plan, the benchmarks)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from lrinfer.errors import LrinferError
from lrinfer.factors import check_ratio
from lrinfer.offline.allocation.base import get_allocator
from lrinfer.offline.refinement.base import get_refiner
from lrinfer.offline.selection.base import get_selection
from lrinfer.offline.solvers.base import get_solver
from lrinfer.runtime.kernels.configs import RANK_ALIGN

CONFIG_VERSION = 1


@dataclass
class CompressConfig:
    """Everything that decides a compression. Defaults are the CLI's defaults.

    method: solver name (svd, svdllm, ...); ratio: fraction of the compressible linears'
    parameters removed, in (0, 1); selection / allocation: which linears, and how the budget is
    spread; rank_multiple: ranks are rounded to its nearest multiple (16: rows the kernels load 16 bytes
    at a time; other ranks are zero-padded at load, see `LowRankLinear`); modules: restrict
    to these linear names (e.g. ["q_proj", "down_proj"]); calibration: source, samples, length, seed.
    """
    method: str = "svdllm"
    ratio: float = 0.2
    selection: str | None = None        # None: the method's own default (e.g. ResSVD's last layers)
    allocation: str = "uniform"
    rank_multiple: int = RANK_ALIGN     # 16: ranks the kernels load with 16-byte rows
    modules: list[str] | None = None
    calib: str = "auto"                 # auto: chat-format text for a model with a chat template (data.resolve_calib)
    n_samples: int = 32
    seq_len: int = 512
    seed: int = 0
    batch_size: int = 8
    method_options: dict = field(default_factory=dict)
    selection_options: dict = field(default_factory=dict)
    allocation_options: dict = field(default_factory=dict)
    refinement: str = "none"            # after each block is solved (lrinfer/offline/refinement/)
    refinement_options: dict = field(default_factory=dict)
    version: int = CONFIG_VERSION

    def __post_init__(self):
        check_ratio(self.ratio)
        solver = get_solver(self.method)
        self.selection = self.selection or solver.selection
        for what, method, opts in (("solver", solver, self.method_options),
                                   ("selection", get_selection(self.selection), self.selection_options),
                                   ("allocation", get_allocator(self.allocation), self.allocation_options),
                                   ("refinement", get_refiner(self.refinement), self.refinement_options)):
            method.check(opts, f"{what} '{method.name}'")
        from .calibration_data import check_calib_source
        check_calib_source(self.calib)
        for name in ("rank_multiple", "n_samples", "seq_len", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise LrinferError(f"{name} must be >= 1; got {getattr(self, name)}")

    @property
    def needs_backward(self) -> bool:
        """The solver or the allocation back-propagates through the whole model: it cannot stream."""
        return get_solver(self.method).needs_backward or get_allocator(self.allocation).needs_sensitivity

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "CompressConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})
