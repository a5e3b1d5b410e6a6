"""Runs inside vLLM's virtual environment (see tests/_vllm.py); prints one JSON line last.

    python _vllm_child.py generate SPEC.json   greedy tokens of each run in SPEC through vllm.LLM
    python _vllm_child.py tp                   the plugin's tensor-parallel loaders, with vLLM's own layers
    python _vllm_child.py platform             whether the plugin's CPU default is oneDNN here
    python _vllm_child.py generate SPEC.json tp platform   all, in one process
"""
import json
import sys
import time


def layer_summary(model) -> dict:
    """{vLLM layer name: [method class, per-shard ranks, oneDNN?, V's shape, per-shard output features]} for
    the low-rank layers of a loaded model, as held on this tensor-parallel rank (V [in, Σk] read from its
    oneDNN handler once prepacked)."""
    out = {}
    for name, m in model.named_modules():
        method = getattr(m, "quant_method", None)
        if type(method).__name__ == "LrinferLinearMethod":
            onednn = m.lrinfer_onednn
            shape = list(m.V.shape) if onednn is None else [onednn[0].k, onednn[0].n]
            out[name] = [type(method).__name__, [list(r) for r in method.ranks], onednn is not None, shape,
                         list(m.lrinfer_outs)]
    return out


def generate(spec_path: str) -> dict:
    """SPEC: {"models": {name: dir}, "prompts": [[ids]], "max_tokens": n, "dtype": "float32",
    "variants": {run name: [model name, quantization]}, "tensor_parallel_size": 1}: every model with the
    quantization of its config.json, then every variant; one engine at a time. With a tensor-parallel size
    above 1, vLLM's multiprocessing executor runs that many worker processes (the plugin in each); "layers"
    is then one summary per rank."""
    import gc

    from vllm import LLM, SamplingParams

    spec = json.loads(open(spec_path).read())
    tp = spec.get("tensor_parallel_size", 1)
    params = SamplingParams(temperature=0.0, max_tokens=spec["max_tokens"], ignore_eos=True)
    out = {}
    runs = [(name, path, None) for name, path in spec["models"].items()]
    runs += [(run, spec["models"][model], q) for run, (model, q) in spec.get("variants", {}).items()]
    for name, path, quantization in runs:
        t0 = time.time()
        llm = LLM(model=path, dtype=spec.get("dtype", "float32"), max_model_len=256, enforce_eager=True, seed=0,
                  max_num_seqs=8, quantization=quantization, tensor_parallel_size=tp,
                  distributed_executor_backend="mp" if tp > 1 else None)
        t1 = time.time()
        cfg = llm.llm_engine.vllm_config
        res = llm.generate([{"prompt_token_ids": ids} for ids in spec["prompts"]], params, use_tqdm=False)
        t2 = time.time()
        out[name] = {"tokens": [list(r.outputs[0].token_ids) for r in res],
                     "quantization": cfg.model_config.quantization, "tp": cfg.parallel_config.tensor_parallel_size,
                     "layers": llm.apply_model(layer_summary), "start_s": round(t1 - t0, 1),
                     "generate_s": round(t2 - t1, 1)}
        del llm
        gc.collect()
    return out


def tp() -> dict:
    """Simulate tensor-parallel ranks: build vLLM's QKVParallelLinear, MergedColumnParallelLinear and
    RowParallelLinear with the lrinfer quantization config for each (rank, world), load factors through
    the layers' own load paths (load_weights with shard ids, as AutoWeightsLoader does; weight_loader for
    the row-parallel layer), and check that gathering / summing the ranks' outputs gives the full layer."""
    import torch
    import vllm.distributed.parallel_state as ps
    import vllm.model_executor.layers.linear as lin
    from vllm.config import VllmConfig, set_current_vllm_config

    import lrinfer.runtime.vllm_plugin as plugin
    from lrinfer.runtime.kernels import lowrank_linear_reference

    plugin.register()
    g = torch.Generator().manual_seed(0)
    dt = torch.float64
    hidden, head, n_heads, n_kv, inter = 64, 8, 8, 2, 96
    ranks = {"q_proj": [12, 4], "k_proj": [6, 0], "v_proj": [5, 3], "gate_proj": [10, 2], "up_proj": [9, 0],
             "down_proj": [11, 5]}
    shapes = {"q_proj": (n_heads * head, hidden), "k_proj": (n_kv * head, hidden), "v_proj": (n_kv * head, hidden),
              "gate_proj": (inter, hidden), "up_proj": (inter, hidden), "down_proj": (hidden, inter)}
    fac = {}
    for name, (o, i) in shapes.items():
        r1, r2 = ranks[name]
        fac[name] = {"V": torch.randn(i, r1, generator=g, dtype=dt), "U": torch.randn(o, r1, generator=g, dtype=dt)}
        if r2:
            fac[name].update(V2=torch.randn(i, r2, generator=g, dtype=dt), U2=torch.randn(o, r2, generator=g, dtype=dt))
    bias = {n: torch.randn(shapes[n][0], generator=g, dtype=dt) for n in ("q_proj", "k_proj", "v_proj", "down_proj")}

    def full(name, x, b=True):
        f = fac[name]
        return lowrank_linear_reference(x, f["V"], f["U"], bias.get(name) if b else None, f.get("V2"), f.get("U2"))

    config = plugin.LrinferVllmConfig.from_config({"ranks": {f"m.{n}": r for n, r in ranks.items()}})
    x = torch.randn(5, hidden, generator=g, dtype=dt)
    h = torch.randn(5, inter, generator=g, dtype=dt)
    checked = []
    for world in (1, 2, 4, 8):   # 8 > n_kv: KV heads replicated over 4 ranks each
        qkv_out, gu_out, down_sum = [], [], 0
        for rank in range(world):
            lin.get_tensor_model_parallel_rank = ps.get_tensor_model_parallel_rank = lambda r=rank: r
            lin.get_tensor_model_parallel_world_size = ps.get_tensor_model_parallel_world_size = lambda w=world: w
            with set_current_vllm_config(VllmConfig()):
                qkv = lin.QKVParallelLinear(hidden, head, n_heads, n_kv, bias=True, params_dtype=dt,
                                            quant_config=config, prefix="m.qkv_proj")
                gu = lin.MergedColumnParallelLinear(hidden, [inter, inter], bias=False, params_dtype=dt,
                                                    quant_config=config, prefix="m.gate_up_proj")
                down = lin.RowParallelLinear(inter, hidden, bias=True, params_dtype=dt, quant_config=config,
                                             prefix="m.down_proj")
            assert type(qkv.quant_method).__name__ == "LrinferLinearMethod"
            weights = []
            for sid, name in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj")):
                for kind, t in fac[name].items():
                    t = t.clone()
                    t.shard_id = sid
                    weights.append((kind, t))
                b = bias[name].clone()
                b.shard_id = sid
                weights.append(("bias", b))
            list(qkv.load_weights(weights))
            weights = []
            for sid, name in ((0, "gate_proj"), (1, "up_proj")):
                for kind, t in fac[name].items():
                    t = t.clone()
                    t.shard_id = sid
                    weights.append((kind, t))
            list(gu.load_weights(weights))
            for kind, t in fac["down_proj"].items():
                p = getattr(down, kind)
                p.weight_loader(p, t.clone())
            down.bias.weight_loader(down.bias, bias["down_proj"].clone())
            for layer in (qkv, gu, down):
                layer.quant_method.process_weights_after_loading(layer)
            assert {n for n, _ in qkv.named_parameters()} == {"V", "U", "bias"}
            # the forward each rank runs (RowParallelLinear adds the bias on rank 0 only)
            qkv_out.append(qkv.quant_method.apply(qkv, x, qkv.bias))
            gu_out.append(gu.quant_method.apply(gu, x, None))
            x_r = h[:, rank * inter // world:(rank + 1) * inter // world]
            down_sum = down_sum + down.quant_method.apply(down, x_r, down.bias if rank == 0 else None)
        # gather: rank r's q block is heads [r*Hq/W, ...); its k/v block is KV head block r // replicas
        nq, nkv = n_heads * head // world, max(n_kv // world, 1) * head
        q = torch.cat([o[:, :nq] for o in qkv_out], -1)
        reps = max(world // n_kv, 1)
        k = torch.cat([qkv_out[r][:, nq:nq + nkv] for r in range(0, world, reps)], -1)
        v = torch.cat([qkv_out[r][:, nq + nkv:] for r in range(0, world, reps)], -1)
        for r in range(world):   # replicas hold the same block
            assert torch.equal(qkv_out[r][:, nq:], qkv_out[r - r % reps][:, nq:])
        torch.testing.assert_close(q, full("q_proj", x))
        torch.testing.assert_close(k, full("k_proj", x))
        torch.testing.assert_close(v, full("v_proj", x))
        ni = inter // world
        torch.testing.assert_close(torch.cat([o[:, :ni] for o in gu_out], -1), full("gate_proj", x, False))
        torch.testing.assert_close(torch.cat([o[:, ni:] for o in gu_out], -1), full("up_proj", x, False))
        torch.testing.assert_close(down_sum, full("down_proj", h))
        checked.append(world)
    return {"worlds": checked}


def platform() -> dict:
    import lrinfer.runtime.vllm_plugin as plugin
    return {"onednn": plugin.onednn_available()}


if __name__ == "__main__":
    # one process for several jobs (each vLLM start-up costs seconds): generate SPEC.json, tp, platform
    args, result = sys.argv[1:], {}
    while args:
        cmd = args.pop(0)
        result[cmd] = generate(args.pop(0)) if cmd == "generate" else tp() if cmd == "tp" else platform()
    print(json.dumps(result), flush=True)
