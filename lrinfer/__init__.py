"""lrinfer: SVD compression of LLMs and a fused low-rank runtime.

    model, tok, _ = lrinfer.load_model()                    # the packaged SmolLM2-135M
    calib, _ = lrinfer.calibration_batch(tok, "wikitext2", 32, 512)
    result = lrinfer.compress(model, lrinfer.CompressConfig(method="svdllm", ratio=0.2), calib)
"""
from .checkpoint import CheckpointSpec, load_checkpoint, save_checkpoint
from .compress import CompressConfig, CompressionResult, compress
from .data import calibration_batch, eval_windows, resolve_data_dir
from .errors import CheckpointError, LrinferError
from .evaluate import perplexity
from .factors import FactorPair, rank_for_ratio
from .models import compressible_linears, load_model
from .nn import LowRankLinear, patch, unpatch
from . import hf  # noqa: E402,F401  (registers quant_method "lrinfer" with transformers)
from .recipe import Recipe, Screening, apply_result, default_candidates
from .recipe import search as search_recipes

__all__ = [
    "CheckpointError", "CheckpointSpec", "CompressConfig", "CompressionResult", "FactorPair", "LowRankLinear", "LrinferError",
    "calibration_batch", "compress", "compressible_linears", "eval_windows", "load_checkpoint", "load_model",
    "patch", "perplexity", "rank_for_ratio", "resolve_data_dir", "save_checkpoint", "unpatch",
    "Recipe", "Screening", "apply_result", "default_candidates", "search_recipes",
]
__version__ = "0.1.0"
