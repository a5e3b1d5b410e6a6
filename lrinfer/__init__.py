"""lrinfer: SVD compression of LLMs and a fused low-rank runtime.

Three parts, each a package: `lrinfer.offline` (calibration, the four compression stages, the
compression loop, recipes), `lrinfer.runtime` (`LowRankLinear`, the checkpoint format, model loading,
the Triton kernels and ops, the Hugging Face and vLLM integrations) and `lrinfer.evaluation`
(perplexity, zero-shot, chat, benchmarks). `lrinfer.pipeline.run` does what `lrinfer compress` does.

    model, tok, _ = lrinfer.load_model()                    # the packaged SmolLM2-135M
    calib, _ = lrinfer.calibration_batch(tok, "wikitext2", 32, 512)
    result = lrinfer.compress(model, lrinfer.CompressConfig(method="svdllm", ratio=0.2), calib)
"""
from lrinfer.data import eval_windows, resolve_data_dir
from lrinfer.errors import CheckpointError, LrinferError
from lrinfer.evaluation.perplexity import perplexity
from lrinfer.factors import FactorPair, rank_for_ratio
from lrinfer.offline.calibration_data import calibration_batch
from lrinfer.offline.compress import CompressionResult, compress
from lrinfer.offline.config import CompressConfig
from lrinfer.offline.recipe import Recipe, Screening, apply_result, default_candidates
from lrinfer.offline.recipe import search as search_recipes
from lrinfer.runtime import hf  # noqa: F401  (registers quant_method "lrinfer" with transformers)
from lrinfer.runtime.architecture import compressible_linears
from lrinfer.runtime.checkpoint import CheckpointSpec, load_checkpoint, save_checkpoint
from lrinfer.runtime.models import load_model
from lrinfer.runtime.nn import LowRankLinear, patch, unpatch
from lrinfer.version import __version__

__all__ = [
    "CheckpointError", "CheckpointSpec", "CompressConfig", "CompressionResult", "FactorPair", "LowRankLinear", "LrinferError",
    "calibration_batch", "compress", "compressible_linears", "eval_windows", "load_checkpoint", "load_model",
    "patch", "perplexity", "rank_for_ratio", "resolve_data_dir", "save_checkpoint", "unpatch",
    "Recipe", "Screening", "apply_result", "default_candidates", "search_recipes", "__version__",
]
