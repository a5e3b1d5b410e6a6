"""vLLM plugin: serve lrinfer checkpoints with `vllm serve <checkpoint dir>` (UNTESTED: vLLM is not
installable where this was written; see docs/serving.md for what is and is not checked).

Wiring: vLLM loads every `vllm.general_plugins` entry point in each process (API server, engine,
workers) and calls it. `register()` registers the quantization config "lrinfer", which vLLM then
picks from config.json's `quantization_config.quant_method` (no extra file: get_config_filenames
is empty). Each linear named in `ranks` gets `LrinferLinearMethod`; the others stay dense.

Weights (per layer; S = number of fused shards: 3 for qkv_proj, 2 for gate_up_proj, else 1):
  V  [in_per_partition, k_0 + ... + k_{S-1}]   shard i's V_i in its own column block
  U  [out_0 + ... + out_{S-1} (per partition), max k_i]   shard i's U_i rows, zero-padded columns
Column-parallel layers keep their block of U's rows and all of V; row-parallel layers keep their
block of V's rows and all of U (vLLM's RowParallelLinear all-reduces and adds the bias on rank 0).
The forward is one `torch.ops.lrinfer.lowrank_linear` per shard (no host syncs, a fake impl for
torch.compile, CUDA-graph safe), concatenated along the output.
Not supported (raise): residual pairs (ResSVD's V2/U2), a fused layer whose shards are partly
dense, KV heads replicated across ranks (num_kv_heads < tensor-parallel size).
"""
from __future__ import annotations

import torch

QUANT_METHOD = "lrinfer"
# vLLM's fused linears and the Hugging Face linears they stack (Llama, Qwen2/3, Mistral, Gemma)
PACKED_MODULES = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
_QKV_IDS = {"q": 0, "k": 1, "v": 2}


def shard_names(prefix: str) -> list[str]:
    """The checkpoint's linear names behind a vLLM layer prefix: '...qkv_proj' -> [q_proj, k_proj, v_proj]."""
    head, _, last = prefix.rpartition(".")
    if last in PACKED_MODULES:
        return [f"{head}.{n}" if head else n for n in PACKED_MODULES[last]]
    return [prefix]


_REGISTERED = False


def register() -> None:
    """The `vllm.general_plugins` entry point. Idempotent."""
    global _REGISTERED
    if _REGISTERED:
        return
    try:
        import vllm  # noqa: F401
    except ImportError:
        raise ImportError("lrinfer's vLLM plugin needs vLLM: pip install vllm") from None
    _build()
    _REGISTERED = True


def _build() -> None:
    from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size
    from vllm.model_executor.layers.linear import (LinearBase, LinearMethodBase, RowParallelLinear,
                                                   UnquantizedLinearMethod)
    from vllm.model_executor.layers.quantization import register_quantization_config
    from vllm.model_executor.layers.quantization.base_config import QuantizationConfig
    from vllm.model_executor.utils import set_weight_attrs

    import lrinfer.kernels  # noqa: F401  (registers torch.ops.lrinfer.lowrank_linear)

    class LrinferLinearMethod(LinearMethodBase):
        """y = concat_i (x V_i) U_iᵀ + bias for the S shards of one (possibly fused) linear."""

        def __init__(self, ranks: list[int], row_parallel: bool):
            self.ranks = ranks
            self.row_parallel = row_parallel

        def create_weights(self, layer, input_size_per_partition, output_partition_sizes, input_size,
                           output_size, params_dtype, **extra_weight_attrs):
            if len(output_partition_sizes) != len(self.ranks):
                raise ValueError(f"lrinfer: the layer has {len(output_partition_sizes)} output shards but the "
                                 f"checkpoint gives {len(self.ranks)} ranks")
            tp_rank, tp_size = get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size()
            k_off = [sum(self.ranks[:i]) for i in range(len(self.ranks))]
            o_off = [sum(output_partition_sizes[:i]) for i in range(len(output_partition_sizes))]
            V = torch.nn.Parameter(torch.zeros(input_size_per_partition, sum(self.ranks), dtype=params_dtype),
                                   requires_grad=False)
            U = torch.nn.Parameter(torch.zeros(sum(output_partition_sizes), max(self.ranks), dtype=params_dtype),
                                   requires_grad=False)
            row_parallel = self.row_parallel

            def shard_index(loaded_shard_id):
                if loaded_shard_id is None:
                    return 0
                return _QKV_IDS[loaded_shard_id] if isinstance(loaded_shard_id, str) else int(loaded_shard_id)

            def load_V(param, loaded_weight, loaded_shard_id=None):  # loaded_weight [in, k_i]
                i = shard_index(loaded_shard_id)
                if row_parallel:
                    loaded_weight = loaded_weight.narrow(0, tp_rank * input_size_per_partition,
                                                         input_size_per_partition)
                param.data[:, k_off[i]:k_off[i] + self.ranks[i]].copy_(loaded_weight)

            def load_U(param, loaded_weight, loaded_shard_id=None):  # loaded_weight [out_i, k_i]
                i = shard_index(loaded_shard_id)
                rows = output_partition_sizes[i]
                if not row_parallel:
                    if loaded_weight.shape[0] != rows * tp_size:
                        raise NotImplementedError("lrinfer: replicated KV heads (num_kv_heads < tensor-parallel "
                                                  "size) are not supported")
                    loaded_weight = loaded_weight.narrow(0, tp_rank * rows, rows)
                param.data[o_off[i]:o_off[i] + rows, :self.ranks[i]].copy_(loaded_weight)

            layer.register_parameter("V", V)
            layer.register_parameter("U", U)
            attrs = {k: v for k, v in extra_weight_attrs.items() if k != "weight_loader"}
            set_weight_attrs(V, {**attrs, "weight_loader": load_V})
            set_weight_attrs(U, {**attrs, "weight_loader": load_U})
            layer.lrinfer_segments = [(k_off[i], self.ranks[i], o_off[i], output_partition_sizes[i])
                                      for i in range(len(self.ranks))]

        def process_weights_after_loading(self, layer) -> None:
            # contiguous per-shard factors; drop the padded load buffers
            layer.lrinfer_factors = [(layer.V.data[:, k0:k0 + k].contiguous(), layer.U.data[o0:o0 + o, :k].contiguous())
                                     for k0, k, o0, o in layer.lrinfer_segments]
            del layer.V, layer.U

        def apply(self, layer, x, bias=None):
            ys = []
            for (V, U), (_, _, o0, o) in zip(layer.lrinfer_factors, layer.lrinfer_segments):
                b = None if bias is None else bias[o0:o0 + o]
                ys.append(torch.ops.lrinfer.lowrank_linear(x, V, U, b, None, None))
            return ys[0] if len(ys) == 1 else torch.cat(ys, dim=-1)

    @register_quantization_config(QUANT_METHOD)
    class LrinferVllmConfig(QuantizationConfig):
        """config.json's quantization_config {quant_method: lrinfer, ranks: {name: [k, k2]}, ...}."""

        def __init__(self, ranks: dict):
            super().__init__()
            self.ranks = ranks

        def get_name(self):
            return QUANT_METHOD

        def get_supported_act_dtypes(self):
            return [torch.float16, torch.bfloat16, torch.float32]

        @classmethod
        def get_min_capability(cls) -> int:
            return 70  # the Triton kernels; older GPUs fall back to cuBLAS through the op's config

        @staticmethod
        def get_config_filenames() -> list[str]:
            return []  # everything is in config.json

        @classmethod
        def from_config(cls, config: dict) -> "LrinferVllmConfig":
            ranks = {}
            for name, rk in config.get("ranks", {}).items():
                r1, r2 = (list(rk) + [0])[:2] if isinstance(rk, (list, tuple)) else (rk, 0)
                if r2:
                    raise NotImplementedError(f"lrinfer vLLM plugin: residual pairs are not supported ({name})")
                ranks[name] = int(r1)
            return cls(ranks)

        def get_quant_method(self, layer, prefix: str):
            if not isinstance(layer, LinearBase):
                return None
            ranks = [self.ranks.get(n) for n in shard_names(prefix)]
            if all(r is None for r in ranks):
                return UnquantizedLinearMethod()
            if any(r is None for r in ranks):
                raise NotImplementedError(f"lrinfer vLLM plugin: {prefix} fuses compressed and dense linears")
            return LrinferLinearMethod(ranks, row_parallel=isinstance(layer, RowParallelLinear))
