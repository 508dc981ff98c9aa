"""End-to-end decode of a randomly initialised Llama-3-8B-shaped model on CUDA: ms per token and KV bytes.

    python benchmarks/cuda_generate.py [--contexts 4096 32768 131072] [--steps 32] [--layers 32]
                                       [--variants dynamic static-compiled tq4] [--out FILE]

Variants (bf16 weights and activations, batch 1):

* ``dynamic``          transformers' ``DynamicCache`` + SDPA, eager;
* ``static-compiled``  ``StaticCache`` + ``torch.compile(mode="reduce-overhead")`` (CUDA graphs), SDPA;
* ``tq4`` / ``tq3``    ``TurboQuantCache`` (4- or 3-bit codes for K and V, its default windows: 4 sink + 112
  recent 16-bit tokens per layer) + ``attn_implementation="tq"``, eager (one quantize launch per K and V
  and one fused attention launch per layer and step);
* ``tq``               ``TurboQuantCache``'s defaults (today 4-bit keys and values: the same cache as ``tq4``);
* ``tq4-graph`` / ``tq3-graph`` / ``tq-graph``  the same with ``device_lengths=True``, the whole decode step captured
  once in a CUDA graph (``torch.cuda.graph``) and replayed; the first replayed logits are checked
  against an eager step of an identical cache.
* ``tq4-graph-compiled`` / ``tq3-graph-compiled``  as ``-graph``, with the model's cache-free parts (RMSNorms,
  MLPs, the rotary application) compiled by ``torch.compile`` first, so their elementwise ops fuse as they do
  in the ``static-compiled`` baseline; the cache and the tq attention stay eager inside the captured graph.
  (``tq4-compiled`` is the same without the graph: the CPU smoke test's way to run the compiled parts.)

Each variant's cache is filled with random K/V of the context length through ``Cache.update`` (no
prefill is run: decode time does not depend on the values), then ``--steps`` greedy decode steps
are timed after 3 warm-up steps (CUDA events around the whole loop, so Python overhead counts).
KV bytes are what the cache holds for the context (``TurboQuantCache.nbytes``: codes, norms,
windows, key offsets; the full-precision caches: K and V tensors). Never asserts; prints a table.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import sys
import time

import torch

DEVICE = "cuda"


def llama8b_config(layers: int, max_positions: int, tiny: bool = False):
    from transformers import LlamaConfig

    if tiny:  # a smoke test of this script on any machine
        return LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=layers, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=64, vocab_size=1000, max_position_embeddings=max_positions)
    return LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers, num_attention_heads=32,
                       num_key_value_heads=8, head_dim=128, vocab_size=128256, max_position_embeddings=max_positions,
                       rope_theta=500000.0)


def build_model(config):
    """Random bf16 weights, created on the GPU in bf16 (no float32 copy of 8B parameters)."""
    from transformers import LlamaForCausalLM

    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(DEVICE):
            return LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(default)


def fill(cache, config, ctx: int, generator: torch.Generator) -> None:
    """Writes ``ctx`` random K/V tokens into every layer of ``cache`` (no model run)."""
    shape = (1, config.num_key_value_heads, ctx, config.head_dim)
    for layer in range(config.num_hidden_layers):
        k = torch.randn(shape, device=DEVICE, dtype=torch.bfloat16, generator=generator)
        v = torch.randn(shape, device=DEVICE, dtype=torch.bfloat16, generator=generator)
        cache.update(k, v, layer, {"cache_position": torch.arange(ctx, device=DEVICE)})


def full_kv_bytes(config, ctx: int) -> int:
    return 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * ctx * 2


def time_decode(step, steps: int) -> float:
    """ms per token over ``steps`` calls of ``step(i)`` after 3 warm-up calls."""
    for i in range(3):
        step(i)
    if DEVICE != "cuda":
        t0 = time.perf_counter()
        for i in range(3, 3 + steps):
            step(i)
        return (time.perf_counter() - t0) * 1e3 / steps
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for i in range(3, 3 + steps):
        step(i)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / steps


@contextlib.contextmanager
def compiled_pointwise_parts(model):
    """``torch.compile`` the decoder's cache-free parts (input/post-attention RMSNorms, MLPs, the final norm and
    ``apply_rotary_pos_emb``) for the duration of the block; restores the eager ones after."""
    import transformers.models.llama.modeling_llama as llama

    # Every layer's modules share one graph (Dynamo inlines nn.Modules: parameters are graph inputs);
    # the limit only matters if that ever stops holding.
    limit = torch._dynamo.config.cache_size_limit
    torch._dynamo.config.cache_size_limit = max(limit, 4 * len(model.model.layers))
    modules = [model.model.norm] + [getattr(layer, name) for layer in model.model.layers
                                    for name in ("input_layernorm", "post_attention_layernorm", "mlp")]
    rotary = llama.apply_rotary_pos_emb
    try:
        for module in modules:
            module.forward = torch.compile(module.forward, dynamic=False)
        llama.apply_rotary_pos_emb = torch.compile(rotary, dynamic=False)
        yield
    finally:
        for module in modules:
            del module.forward  # back to the class's forward
        llama.apply_rotary_pos_emb = rotary
        torch._dynamo.config.cache_size_limit = limit


def run_variant(model, name: str, ctx: int, args) -> tuple[float, int]:
    if name.endswith("-compiled") and name.startswith("tq"):
        with compiled_pointwise_parts(model):
            return _run_variant(model, name.removesuffix("-compiled"), ctx, args)
    return _run_variant(model, name, ctx, args)


def _run_variant(model, name: str, ctx: int, args) -> tuple[float, int]:
    from transformers import DynamicCache, StaticCache

    import torch_tq.integrations.transformers as tqhf

    config = model.config
    # The layers read the implementation from the config at every call.
    config._attn_implementation = "tq" if name.startswith("tq") else "sdpa"
    generator = torch.Generator(device=DEVICE).manual_seed(0)
    token = torch.randint(0, config.vocab_size, (1, 1), device=DEVICE, generator=generator)
    if name == "dynamic":
        cache, nbytes = DynamicCache(config=config), full_kv_bytes(config, ctx)
    elif name == "static-compiled":
        cache, nbytes = StaticCache(config=config, max_cache_len=ctx + args.steps + 16), full_kv_bytes(config, ctx)
    else:
        graph = name.endswith("-graph")
        bits = name.removesuffix("-graph")[2:]  # "" = TurboQuantCache's default widths
        cache = tqhf.TurboQuantCache(config, bits=int(bits) if bits else None, max_cache_len=ctx + args.steps + 16,
                                     device_lengths=graph)
        nbytes = None
    fill(cache, config, ctx, generator)
    if nbytes is None:
        nbytes = cache.nbytes
    if name.endswith("-graph"):
        return time_graph_decode(model, cache, token, ctx, args), nbytes
    forward = model.forward
    if name == "static-compiled":
        forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
    kwargs = tqhf.cache_kwargs(cache)

    @torch.inference_mode()
    def step(i: int) -> None:
        position = torch.tensor([ctx + i], device=DEVICE)
        forward(input_ids=token, cache_position=position, position_ids=position.view(1, 1), use_cache=True, **kwargs)

    ms = time_decode(step, args.steps)
    del cache, forward
    gc.collect()
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    return ms, nbytes


@torch.inference_mode()
def time_graph_decode(model, cache, token, ctx: int, args) -> float:
    """Capture one decode step (model + TurboQuantCache(device_lengths=True)) and time its replays.

    The warm-up steps run eagerly on a side stream (as torch.cuda.graphs requires); the captured
    step's inputs (token, position) are static tensors updated in place before each replay. The
    position ids are passed explicitly: transformers derives them from the cache's host-side length
    otherwise, which a replay would freeze (the rotary embedding of every replayed step would be the
    captured one's).
    """
    import torch_tq.integrations.transformers as tqhf

    kwargs = tqhf.cache_kwargs(cache)
    position = torch.tensor([ctx], device=DEVICE)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            model(input_ids=token, cache_position=position, position_ids=position.view(1, 1), use_cache=True, **kwargs)
            position += 1
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        logits = model(input_ids=token, cache_position=position, position_ids=position.view(1, 1), use_cache=True, **kwargs).logits
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(args.steps):
        graph.replay()
        position += 1
    end.record()
    torch.cuda.synchronize()
    if not torch.isfinite(logits).all():
        raise RuntimeError("the replayed decode step produced non-finite logits")
    return start.elapsed_time(end) / args.steps


def check_ops_graph_replay() -> str:
    """The ops alone: one layer's quantize (K, V) + attention with device lengths, captured once and
    replayed for 4 steps, against the same steps run eagerly with host lengths; max |Δ|."""
    import torch_tq

    B, Hq, Hkv, D, C, ctx = 2, 8, 2, 128, 256, 100
    gen = torch.Generator(DEVICE).manual_seed(3)
    caches = []
    for _ in range(2):
        k = torch_tq.allocate_quantized_kv(B, Hkv, C, D, 4, device=DEVICE)
        v = torch_tq.allocate_quantized_kv(B, Hkv, C, D, 4, device=DEVICE)
        caches.append((*k, *v))
    ks = torch.randn(B, ctx + 4, Hkv, D, device=DEVICE, generator=gen)
    vs = torch.randn(B, ctx + 4, Hkv, D, device=DEVICE, generator=gen)
    qs = torch.randn(4, B, Hq, 1, D, device=DEVICE, generator=gen)
    for c in caches:
        torch_tq.hadamard_quantize_kv(ks[:, :ctx], c[0], c[1], 0)
        torch_tq.hadamard_quantize_kv(vs[:, :ctx], c[2], c[3], 0)
    eager = []
    for i in range(4):
        c = caches[0]
        torch_tq.hadamard_quantize_kv(ks[:, ctx + i : ctx + i + 1], c[0], c[1], ctx + i)
        torch_tq.hadamard_quantize_kv(vs[:, ctx + i : ctx + i + 1], c[2], c[3], ctx + i)
        eager.append(torch_tq.flash_attn_vec_tq(qs[i], *c, ctx + i + 1, D**-0.5))
    c = caches[1]
    written = torch.full((B,), ctx, dtype=torch.int32, device=DEVICE)
    total = written + 1
    k_new, v_new, q = ks[:, ctx : ctx + 1].clone(), vs[:, ctx : ctx + 1].clone(), qs[0].clone()

    def step():
        torch_tq.hadamard_quantize_kv(k_new, c[0], c[1], 0, cache_seqlens=written)
        torch_tq.hadamard_quantize_kv(v_new, c[2], c[3], 0, cache_seqlens=written)
        return torch_tq.flash_attn_vec_tq(q, *c, C, D**-0.5, cache_seqlens=total)

    step()  # warm-up (compiles); then rewrite step 0's slot the same way
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    replayed = []
    for i in range(4):
        k_new.copy_(ks[:, ctx + i : ctx + i + 1])
        v_new.copy_(vs[:, ctx + i : ctx + i + 1])
        q.copy_(qs[i])
        written.fill_(ctx + i)
        total.fill_(ctx + i + 1)
        graph.replay()
        replayed.append(out.clone())
    diffs = [(a - b).abs().max().item() for a, b in zip(eager, replayed)]
    return "ops only (quantize K, V + attention, device lengths, CUDA graph) vs eager host lengths, 4 steps: max |Δ| " + \
        ", ".join(f"{d:.3g}" for d in diffs)


def check_graph_replay_matches_eager(model, ctx: int, args, **cache_options) -> str:
    """Identical caches: host-length eager, device-length eager, device-length CUDA-graph replays; max |Δlogit| per step."""
    import torch_tq.integrations.transformers as tqhf

    config = model.config
    config._attn_implementation = "tq"
    caches = []
    for device_lengths in (False, True, True):
        cache = tqhf.TurboQuantCache(config, bits=4, max_cache_len=ctx + 16, device_lengths=device_lengths,
                                     **cache_options)
        fill(cache, config, ctx, torch.Generator(device=DEVICE).manual_seed(1))
        caches.append(cache)
    tokens = torch.randint(0, config.vocab_size, (4, 1, 1), device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(2))

    def eager(cache):
        positions = [torch.tensor([ctx + i], device=DEVICE) for i in range(4)]
        return [model(input_ids=tokens[i], cache_position=positions[i], position_ids=positions[i].view(1, 1),
                      use_cache=True, **tqhf.cache_kwargs(cache)).logits.float() for i in range(4)]

    with torch.inference_mode():
        host, device = eager(caches[0]), eager(caches[1])
        token, position = tokens[0].clone(), torch.tensor([ctx], device=DEVICE)
        kwargs = tqhf.cache_kwargs(caches[2])
        # One eager step (also the warm-up), then capture the next step and replay it for steps 1-3.
        first = model(input_ids=token, cache_position=position, position_ids=position.view(1, 1), use_cache=True, **kwargs).logits.float()
        graph = torch.cuda.CUDAGraph()
        token.copy_(tokens[1])
        position += 1
        with torch.cuda.graph(graph):
            logits = model(input_ids=token, cache_position=position, position_ids=position.view(1, 1), use_cache=True, **kwargs).logits
        replayed = [first]
        for i in range(1, 4):
            token.copy_(tokens[i])
            position.fill_(ctx + i)
            graph.replay()
            replayed.append(logits.float().clone())
    fmt = lambda xs, ys: ", ".join(f"{(a - b).abs().max().item():.3g}" for a, b in zip(xs, ys))  # noqa: E731
    state = []
    for layer in (0, len(caches[1].layers) - 1):
        a, b = caches[1].layers[layer].kv, caches[2].layers[layer].kv
        for name in ("k_codes", "k_norms", "v_codes", "v_norms", "sink_k", "recent_k", "recent_v", "k_mean"):
            x, y = getattr(a, name), getattr(b, name)
            if not torch.equal(x, y):
                state.append(f"layer {layer} {name} differs")
    lengths = (caches[1].layers[0].lengths.total.tolist(), caches[2].layers[0].lengths.total.tolist())
    return (f"model at context {ctx} {cache_options}, max |Δlogit| per step: device-length eager vs host-length eager "
            f"{fmt(device, host)}; CUDA-graph replay vs device-length eager {fmt(replayed, device)}; cache state after: "
            f"{'; '.join(state) or 'identical'}; lengths {lengths}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[4096, 32768, 131072])
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--layers", type=int, default=32, help="decoder layers (32 = Llama-3-8B)")
    parser.add_argument("--variants", nargs="+", default=["dynamic", "static-compiled", "tq4", "tq4-graph"],
                        choices=["dynamic", "static-compiled", "tq", "tq4", "tq3", "tq-graph", "tq4-graph", "tq3-graph",
                                 "tq-compiled", "tq4-compiled", "tq-graph-compiled", "tq4-graph-compiled",
                                 "tq3-graph-compiled"])
    parser.add_argument("--out", default=None, help="also write the table to this file")
    parser.add_argument("--tiny-cpu-smoke-test", action="store_true",
                        help="a tiny model on the CPU: checks that the script runs, measures nothing meaningful")
    args = parser.parse_args()
    global DEVICE
    if args.tiny_cpu_smoke_test:
        DEVICE = "cpu"
    elif not torch.cuda.is_available():
        sys.exit("cuda_generate.py needs a CUDA device (or --tiny-cpu-smoke-test)")
    import transformers

    device_name = torch.cuda.get_device_name() if DEVICE == "cuda" else "CPU smoke test (tiny model)"
    lines = [f"date {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC} | {device_name} | "
             f"torch {torch.__version__} | transformers {transformers.__version__} | Llama-3-8B shape, "
             f"{args.layers} layers, bf16, B1, random weights | {args.steps} timed decode steps after 3 warm-up"]
    header = f"{'variant':<17}{'context':>9}{'ms/token':>10}{'KV MiB':>10}{'vs dynamic':>12}"
    lines += [header, "-" * len(header)]
    print("\n".join(lines), flush=True)
    model = build_model(llama8b_config(args.layers, max(args.contexts) + args.steps + 16, args.tiny_cpu_smoke_test))
    if DEVICE == "cuda" and any("-graph" in v for v in args.variants):
        for line in (check_ops_graph_replay(), check_graph_replay_matches_eager(model, min(args.contexts), args),
                     check_graph_replay_matches_eager(model, min(args.contexts), args, sink_tokens=0, recent_tokens=0)):
            lines.append(line)
            print(line, flush=True)
    for ctx in args.contexts:
        baseline = None
        for name in args.variants:
            try:
                ms, nbytes = run_variant(model, name, ctx, args)
            except Exception as exc:  # noqa: BLE001 - report the failure in the table and go on
                line = f"{name:<17}{ctx:>9}  failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
            else:
                baseline = ms if name == "dynamic" else baseline
                ratio = f"{baseline / ms:.2f}x" if baseline else "—"
                line = f"{name:<17}{ctx:>9}{ms:>10.2f}{nbytes / 2**20:>10.1f}{ratio:>12}"
            lines.append(line)
            print(line, flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
