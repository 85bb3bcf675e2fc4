"""Engine speed on one GPU: decode step time vs the memory roofline, prefill throughput and MFU, and end-to-end
output throughput next to HF transformers ``generate`` on the same random weights, all in one run.

    python benchmarks/engine.py --model-shape llama3-8b --out results/engine.json

Prints a table and writes JSON. Figures are ratios against ceilings measured in the same run (device-to-device
copy bandwidth, bf16 matmul rate), so they transfer across cards.

Decode is timed twice per batch on CUDA: through the CUDA graphs and eagerly (the same engine with its graphs set
aside), next to the host time of a step, the Python work of building its inputs; then as served, whole
``engine.step`` periods, with and without overlapped steps (the next launched before the last is read back).
``--no-graphs`` builds the
engine without graphs (eager only). ``--profile-batch`` sums the kernel time of one decode step by kind (matmul,
attention, norm, ...) with the torch profiler, through the graphs and eagerly.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from splitserve.bench.engine_timing import (
    admitted_for_decode,
    decode_ready,
    decode_step,
    finish,
    prefill_batch,
    served_decode_period,
    timed,
)
from splitserve.bench.make_random_checkpoint import SHAPES, llama_config
from splitserve.bench.step_profile import kernel_breakdown
from splitserve.engine import Engine, EngineConfig, RunnerConfig, SamplingParams, layer_ops
from splitserve.engine.sequence import Sequence


def copy_bandwidth(device: torch.device) -> float:
    """Bytes/s of a large device-to-device copy, counting bytes read plus bytes written."""
    n = (1 << 30) if device.type == "cuda" else (1 << 26)
    a = torch.empty(n, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    b.copy_(a)
    return 2 * n / timed(lambda: b.copy_(a), device, 10)


def matmul_flops(device: torch.device, dtype: torch.dtype) -> float:
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    return 2 * n**3 / timed(lambda: a @ b, device, 10)


def host_seconds(engine: Engine, seqs: list[Sequence], repeat: int = 50) -> float:
    """Median seconds of a decode step's host work: the input lists, plus staging them for the graph if any."""
    runner = engine.runner

    def prepare():
        ids, positions, slots = runner._decode_inputs(seqs)
        if runner.graphs is not None:
            tables = [s.block_table for s in seqs]
            runner.graphs._stage(ids, positions, slots, tables, [p + 1 for p in positions], len(seqs))

    return timed(prepare, torch.device("cpu"), repeat)  # host only: no device sync around it


def weight_bytes_per_step(model) -> int:
    """Weight bytes a decode step reads: every matrix and norm, but of an untied embedding table only the rows of
    the batch's tokens (counted with the batch)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    if model.spec.tie_word_embeddings:  # the table is read whole as the LM head
        return total
    table = model.embed_tokens.weight
    return total - table.numel() * table.element_size()


def bench_decode(engine: Engine, batches: list[int], context: int, bw: float, steps: int) -> list[dict]:
    runner = engine.runner
    graphs = runner.graphs
    weight_bytes = weight_bytes_per_step(runner.model)
    kv_per_token = runner.spec.kv_bytes_per_token(runner.dtype.itemsize)
    rows = []
    for b in batches:
        if engine.blocks.blocks_for(context + 64) * b > engine.blocks.num_free:
            continue
        seqs = decode_ready(engine, b, context, f"d{b}")
        step = decode_step(engine, seqs)  # stays at the same context length: every step reads the same bytes
        step()
        t = timed(step, runner.device, steps)
        eager = t
        if graphs is not None:
            runner.graphs = None
            step()
            eager = timed(step, runner.device, steps)
            runner.graphs = graphs
        host = host_seconds(engine, seqs)
        for s in seqs:
            engine.blocks.free(s.block_table)
        served = {overlap: served_period(engine, b, context, steps, overlap) for overlap in (False, True)}
        moved = weight_bytes + b * (runner.spec.hidden_size * runner.dtype.itemsize + (context + 1) * kv_per_token)
        rows.append(
            {
                "batch": b,
                "context": context,
                "graphs": graphs is not None,
                "step_ms": t * 1e3,
                "eager_step_ms": eager * 1e3,
                "host_ms": host * 1e3,
                "served_step_ms": served[False] * 1e3,
                "overlapped_step_ms": served[True] * 1e3,
                "tokens_per_s": b / t,
                "bandwidth_util": moved / t / bw,
            }
        )
    return rows


def served_period(engine: Engine, batch: int, context: int, steps: int, overlap: bool) -> float:
    """The period of whole served steps (``engine.step``: scheduling, forward, sampling, tokens appended and
    detokenized), with or without the next step launched before the last is read back."""
    was, engine.overlap_decode = engine.overlap_decode, overlap
    seqs = admitted_for_decode(engine, batch, context, f"served{int(overlap)}-{batch}")
    try:
        return served_decode_period(engine, steps)
    finally:
        finish(engine, seqs)
        engine.overlap_decode = was


def profile_decode(engine: Engine, batch: int, context: int) -> dict:
    """Kernel time by category of one decode step at ``batch``, through the graphs (as served) and eagerly."""
    runner = engine.runner
    seqs = decode_ready(engine, batch, context, "prof")
    step = decode_step(engine, seqs)
    graphs = runner.graphs
    # Wall times first: once the profiler has run, its hooks slow every later step a little.
    result: dict = {"batch": batch, "context": context, "graph_step_us": timed(step, runner.device, 20) * 1e6}
    runner.graphs = None
    result["eager_step_us"] = timed(step, runner.device, 20) * 1e6
    result["eager"] = kernel_breakdown(step)
    runner.graphs = graphs
    result["graph"] = kernel_breakdown(step)
    result["kernels_per_step"] = result["eager"]["kernels_per_step"]
    for s in seqs:
        engine.blocks.free(s.block_table)
    return result


def bench_prefill(engine: Engine, cases: dict[str, list[int]], peak_flops: float) -> list[dict]:
    runner = engine.runner
    params = runner.spec.num_params()
    rows = []
    for name, lengths in cases.items():
        run = prefill_batch(engine, lengths, f"p{name}")
        run()
        t = timed(run, runner.device, 5)
        tokens = sum(lengths)
        attn = sum(2 * 2 * n * n * runner.spec.q_size * runner.spec.num_layers // 2 for n in lengths)
        rows.append(
            {
                "case": name,
                "tokens": tokens,
                "ms": t * 1e3,
                "tokens_per_s": tokens / t,
                "mfu": (2 * params * tokens + attn) / t / peak_flops,
            }
        )
    return rows


def hf_vs_ours(
    engine: Engine, batch: int, prompt_len: int, new_tokens: int, ours_requests: int, mixed: list[int]
) -> dict:
    """Output tokens/s of HF ``generate`` and of our engine on the same weights and prompts.

    Ours runs twice: on HF's batch (the same requests), and on ``ours_requests`` requests of the same shape, which
    continuous batching serves together: the throughput a server gets from the GPU when the load is there. Prefill
    is compared on one 2048-token prompt and on the ``mixed`` lengths, which HF must pad to the longest. Each side
    is warmed up first. HF with the very generate it is timed on: its first pass over each new sequence length is
    slow (timed cold, or after a 2-token warm-up, it ran at a third of its speed on an H100).
    """
    from transformers import AutoModelForCausalLM

    runner = engine.runner
    with runner.device:  # initialise on the GPU: a CPU init of 8B random weights takes minutes
        hf = AutoModelForCausalLM.from_config(runner.hf_config, dtype=runner.dtype).eval()
    copy_weights_into_hf(engine, hf)
    prompts = torch.randint(0, 1000, (batch, prompt_len), device=runner.device)
    _time_hf_generate(hf, prompts, new_tokens, runner.device)  # warm-up: see the docstring
    hf_time = _time_hf_generate(hf, prompts, new_tokens, runner.device)
    hf_prefill = _hf_prefill_seconds(hf, [2048], runner.device)
    hf_mixed = _hf_prefill_seconds(hf, mixed, runner.device)
    del hf
    if runner.device.type == "cuda":
        torch.cuda.empty_cache()
    params = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
    many = torch.randint(0, 1000, (ours_requests, prompt_len)).tolist()
    engine.generate(many, SamplingParams(max_tokens=2, ignore_eos=True))  # warm-up, as HF's
    ours_time = timed(lambda: engine.generate([p.tolist() for p in prompts], params), runner.device, 1)
    many_time = timed(lambda: engine.generate(many, params), runner.device, 1)
    ours_prefill = timed(prefill_batch(engine, [2048], "hf-one"), runner.device, 3)
    ours_mixed = timed(prefill_batch(engine, mixed, "hf-mixed"), runner.device, 3)
    out_tokens = batch * new_tokens
    return {
        "batch": batch,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "hf_tokens_per_s": out_tokens / hf_time,
        "ours_tokens_per_s": out_tokens / ours_time,
        "speedup": hf_time / ours_time,
        "ours_requests": ours_requests,
        "ours_many_tokens_per_s": ours_requests * new_tokens / many_time,
        "speedup_many": ours_requests * new_tokens / many_time / (out_tokens / hf_time),
        "hf_prefill_ms": hf_prefill * 1e3,
        "ours_prefill_ms": ours_prefill * 1e3,
        "prefill_vs_hf": hf_prefill / ours_prefill,
        "mixed_lengths": mixed,
        "hf_mixed_prefill_ms": hf_mixed * 1e3,
        "ours_mixed_prefill_ms": ours_mixed * 1e3,
        "mixed_prefill_vs_hf": hf_mixed / ours_mixed,
    }


def _time_hf_generate(hf, prompts: torch.Tensor, new_tokens: int, device: torch.device) -> float:
    """Seconds for HF ``generate`` on the batch."""
    mask = torch.ones_like(prompts)
    return timed(
        lambda: hf.generate(
            prompts, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False
        ),
        device,
        1,
    )


@torch.no_grad()
def _hf_prefill_seconds(hf, lengths: list[int], device: torch.device) -> float:
    """HF's forward over prompts of ``lengths`` as HF batches them: right-padded to the longest, masked, and with
    logits for the last position only (as our prefill computes them)."""
    longest = max(lengths)
    ids = torch.randint(0, 1000, (len(lengths), longest), device=device)
    mask = (torch.arange(longest, device=device)[None, :] < torch.tensor(lengths, device=device)[:, None]).long()
    return timed(lambda: hf(ids, attention_mask=mask, logits_to_keep=1), device, 3)


@torch.no_grad()
def copy_weights_into_hf(engine: Engine, hf) -> None:
    spec, ours = engine.spec, engine.runner.model
    hf.model.embed_tokens.weight.copy_(ours.embed_tokens.weight)
    hf.model.norm.weight.copy_(ours.norm.weight)
    hf.lm_head.weight.copy_(ours.lm_head.weight)
    for mine, theirs in zip(ours.layers, hf.model.layers, strict=True):
        q, k, v = mine.self_attn.qkv_proj.weight.split([spec.q_size, spec.kv_size, spec.kv_size])
        theirs.self_attn.q_proj.weight.copy_(q)
        theirs.self_attn.k_proj.weight.copy_(k)
        theirs.self_attn.v_proj.weight.copy_(v)
        theirs.self_attn.o_proj.weight.copy_(mine.self_attn.o_proj.weight)
        gate, up = mine.mlp.gate_up_proj.weight.chunk(2)
        theirs.mlp.gate_proj.weight.copy_(gate)
        theirs.mlp.up_proj.weight.copy_(up)
        theirs.mlp.down_proj.weight.copy_(mine.mlp.down_proj.weight)
        theirs.input_layernorm.weight.copy_(mine.input_layernorm.weight)
        theirs.post_attention_layernorm.weight.copy_(mine.post_attention_layernorm.weight)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model-shape", default="llama3-8b", choices=sorted(SHAPES))
    ap.add_argument("--device", default="auto")
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--batches", default="1,8,32,64,128")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--hf-batch", type=int, default=32)
    ap.add_argument("--hf-new-tokens", type=int, default=128)
    ap.add_argument("--ours-requests", type=int, default=256, help="requests for our engine's loaded throughput")
    ap.add_argument("--profile-batch", type=int, default=32, help="decode batch whose kernels are profiled; 0: none")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--no-graphs", action="store_true", help="eager decode only (no CUDA graphs)")
    ap.add_argument(
        "--fused",
        default=",".join(layer_ops.FUSABLE),
        help=f"steps run as one Triton kernel each on CUDA, of {','.join(layer_ops.FUSABLE)}; empty: plain torch",
    )
    ap.add_argument("--out", default="results/engine.json")
    args = ap.parse_args()
    layer_ops.fused_ops = {op for op in args.fused.split(",") if op}
    if not layer_ops.fused_ops <= set(layer_ops.FUSABLE):
        ap.error(f"--fused: unknown step in {args.fused!r}; choose from {','.join(layer_ops.FUSABLE)}")

    engine = Engine(
        EngineConfig(
            RunnerConfig(
                model_dir=None,
                device=args.device,
                max_batch_tokens=8192,
                gpu_memory_fraction=0.55,
                use_cuda_graphs=not args.no_graphs,
            ),
            max_batch_size=256,
            enable_prefix_caching=False,
        ),  # repeated prompts must be recomputed
        hf_config=llama_config(args.model_shape),
    )
    device, dtype = engine.runner.device, engine.runner.dtype
    bw, peak = copy_bandwidth(device), matmul_flops(device, dtype)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        f"device {name}: copy {bw / 1e9:.0f} GB/s, matmul {peak / 1e12:.0f} TFLOP/s ({dtype}); "
        f"{engine.runner.num_kv_blocks} KV blocks"
    )
    graphs = engine.runner.graphs
    if graphs is not None:
        print(f"CUDA graphs for batch sizes {graphs.captured} captured at start in {graphs.capture_seconds:.1f} s")
    decode = bench_decode(engine, [int(b) for b in args.batches.split(",")], args.context, bw, args.steps)
    print(
        f"\n{'batch':>6} {'ctx':>5} {'step ms':>9} {'eager ms':>9} {'host ms':>8} {'served':>8} {'overlap':>8} "
        f"{'tok/s':>9} {'BW util':>8}"
    )
    for r in decode:
        print(
            f"{r['batch']:>6} {r['context']:>5} {r['step_ms']:>9.2f} {r['eager_step_ms']:>9.2f} {r['host_ms']:>8.3f} "
            f"{r['served_step_ms']:>8.2f} {r['overlapped_step_ms']:>8.2f} {r['tokens_per_s']:>9.0f} "
            f"{r['bandwidth_util']:>7.0%}"
        )
    print("served: engine.step periods (host work included), one step read back before the next launch (served) or")
    print("the next launched first (overlap); step: forward + sampling alone, the device's floor.")
    breakdown = None
    if args.profile_batch and device.type == "cuda":
        breakdown = profile_decode(engine, args.profile_batch, args.context)
        graph, eager = breakdown["graph"], breakdown["eager"]
        print(f"\ndecode step, batch {args.profile_batch}: {breakdown['kernels_per_step']:.0f} kernels")
        print(f"{'kernels':>18} {'graph µs':>9} {'eager µs':>9} {'share':>6}")
        for cat, us in eager["by_category_us"].items():
            print(f"{cat:>18} {graph['by_category_us'].get(cat, 0):>9.0f} {us:>9.0f} {us / eager['kernel_us']:>6.0%}")
        print(f"{'sum of kernels':>18} {graph['kernel_us']:>9.0f} {eager['kernel_us']:>9.0f}")
        print(f"{'step wall':>18} {breakdown['graph_step_us']:>9.0f} {breakdown['eager_step_us']:>9.0f}")
    mixed = [64, 4096, 512, 1024, 128, 2048, 256, 96]
    prefill = bench_prefill(engine, {"1x2048": [2048], "8x512": [512] * 8, "mixed": mixed}, peak)
    print(f"\n{'prefill':>8} {'tokens':>7} {'ms':>9} {'tok/s':>9} {'MFU':>6}")
    for r in prefill:
        print(f"{r['case']:>8} {r['tokens']:>7} {r['ms']:>9.1f} {r['tokens_per_s']:>9.0f} {r['mfu']:>5.0%}")
    versus = None
    if not args.skip_hf:
        versus = hf_vs_ours(engine, args.hf_batch, args.context, args.hf_new_tokens, args.ours_requests, mixed)
        print(
            f"\nHF generate {versus['hf_tokens_per_s']:.0f} tok/s, ours {versus['ours_tokens_per_s']:.0f} tok/s "
            f"({versus['speedup']:.1f}x) on the same {args.hf_batch} requests, "
            f"{versus['ours_many_tokens_per_s']:.0f} tok/s ({versus['speedup_many']:.1f}x) on {args.ours_requests}; "
            f"prefill ours/HF speed {versus['prefill_vs_hf']:.2f} on one 2048-token prompt, "
            f"{versus['mixed_prefill_vs_hf']:.2f} on the mixed batch (HF padded)"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "device": name,
                "dtype": str(dtype),
                "shape": args.model_shape,
                "copy_bandwidth_Bps": bw,
                "matmul_flops": peak,
                "cuda_graphs": engine.runner.graphs is not None,
                "fused_kernels": sorted(layer_ops.fused_ops),
                "graph_capture_s": engine.runner.graphs.capture_seconds if engine.runner.graphs else None,
                "decode": decode,
                "prefill": prefill,
                "decode_profile": breakdown,
                "hf_comparison": versus,
                "date": time.strftime("%Y-%m-%d"),
            },
            indent=2,
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
