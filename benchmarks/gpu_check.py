"""One-command GPU check: the numbers and kernels the paper-scale run depends on, in minutes.

1. parity: fast == reference (dense-mask) attention for every sink option, in bf16 autocast;
2. SDPA kernels: which backend the fast sink path and the dense-mask path run (the profiler's
   aten op), which backends accept them (`torch.nn.attention.sdpa_kernel`), and that the fast path
   runs a fused kernel (flash or memory-efficient), forward and backward;
3. train-step time of the preset (plain, sink-fast, sink-dense, gated) at its block size in bf16,
   with MFU against the measured bf16 matmul peak and the GPU's data-sheet peak;
4. sampler time on a random sink model: full recompute vs dual cache + confidence threshold;
5. one FSDP2 step through the trainer's Fabric set-up, and a sharded save/load round trip.

    python -m benchmarks.gpu_check                                 # one GPU, the 472M preset
    python -m benchmarks.gpu_check --device cpu --preset tiny      # the same checks in seconds

Writes gpu_check.md and gpu_check.json into --out; exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks import bench_generate, bench_train, common
from sinkdlm.config import SMDM_VOCAB, Config, ModelConfig, TrainConfig, model_preset
from sinkdlm.model import DLM
from sinkdlm.sample import SampleConfig

BF16 = torch.bfloat16
# every sink option (as tests/test_model.py enumerates them; 1-2 sinks suffice for the kernels)
SINK_OPTIONS = [dict(sink_tokens=n, sink_position=pos, sink_zero_value=zv, sink_self_only=so, attn_gate=gate)
                for n, pos, zv, so, gate in itertools.product([1, 2], ["front", "end"], [False, True], [True, False],
                                                              ["none", "elementwise", "headwise"])]
PARITY_TOLERANCE = 2e-2  # max |fast - reference| / max |reference| over the logits: bf16 keeps 8 bits
# the preset's width and heads (what the kernels see), fewer layers and a small vocabulary
PARITY_LAYERS, PARITY_VOCAB, PARITY_BATCH, PARITY_SEQ = 2, 1024, 2, 128
PADDED_SHARE = 4  # the padded check's second row loses its last 1/4
SDPA_OPS = {  # aten op -> backend (the CPU's flash kernel is `..._flash_attention_for_cpu`)
    "aten::_scaled_dot_product_flash_attention": "flash",
    "aten::_scaled_dot_product_efficient_attention": "efficient",
    "aten::_scaled_dot_product_cudnn_attention": "cudnn",
    "aten::_scaled_dot_product_attention_math": "math",
}
FUSED = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION")
# dense bf16 tensor-core peaks from NVIDIA's data sheets (TFLOP/s, no sparsity); first match wins
BF16_PEAK_TFLOPS = [("H100 PCIe", 756.0), ("H100", 989.4), ("H200", 989.4), ("A100", 312.0),
                    ("L40S", 362.1), ("L4", 121.0)]
STEP_BATCH = 8  # the paper config's micro-batch
STEP_REPEATS, STEP_WARMUP = 5, 2
GEN_LENGTH, GEN_BATCH, THRESHOLD, GEN_REPEATS = 256, 4, 0.9, 2
FSDP_SEED = 1
# the peak's square matmul: 2048^2 does not fill a large GPU; a CPU run only checks the plumbing
MATMUL_SIZE = {"cuda": 8192, "cpu": 512}


# ---------------------------------------------------------------------------------------------
# the checks


def parity(preset: ModelConfig, device: torch.device) -> list[dict[str, Any]]:
    """fast vs reference logits, bf16 autocast, same weights, with and without padding."""
    rows = []
    seq = min(PARITY_SEQ, preset.block_size)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(PARITY_VOCAB, (PARITY_BATCH, seq), generator=gen).to(device)
    padding = torch.ones(PARITY_BATCH, seq, dtype=torch.long, device=device)
    padding[-1, seq - seq // PADDED_SHARE:] = 0
    for options in SINK_OPTIONS:
        base = dataclasses.replace(preset, n_layer=PARITY_LAYERS, vocab_size=PARITY_VOCAB, block_size=seq, **options)
        torch.manual_seed(0)
        with device:  # initialised where it runs: fast on a GPU
            fast = DLM(base).eval()
            reference = DLM(base.with_runtime(attn_impl="reference")).eval()
        reference.load_state_dict(fast.state_dict())
        for mask in (None, padding):
            with torch.no_grad(), torch.autocast(device.type, dtype=BF16):
                out_f, out_r = fast(ids, mask).float(), reference(ids, mask).float()
            keep = slice(None) if mask is None else mask.bool()
            error = ((out_f - out_r)[keep].abs().max() / out_r[keep].abs().max()).item()
            rows.append({"options": options, "padded": mask is not None, "relative_error": error,
                         "ok": error <= PARITY_TOLERANCE})
    return rows


def backends_used(fn: Callable[[], Any]) -> list[str]:
    """The SDPA backends fn() dispatched to by default, from the aten ops the profiler recorded
    (math is a composite op: only the profiler, which records every level, sees it)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    names = {event.name for event in prof.events()}
    return sorted({backend for op, backend in SDPA_OPS.items() if any(n.startswith(op) for n in names)})


def backends_accepted(fn: Callable[[], Any]) -> list[str]:
    """The backends fn() runs under when sdpa_kernel allows only that one."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    accepted = []
    for name in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"):
        try:
            with sdpa_kernel([getattr(SDPBackend, name)]):
                fn()
            accepted.append(name)
        except RuntimeError:  # "No available kernel" / "No viable backend"
            pass
    return accepted


def sdpa_kernels(preset: ModelConfig, device: torch.device) -> list[dict[str, Any]]:
    """The training setting (no padding, bf16 autocast), forward and backward, per sink path."""
    rows = []
    for path in ("sink-fast", "sink-dense"):
        cfg = dataclasses.replace(preset, n_layer=PARITY_LAYERS, vocab_size=PARITY_VOCAB, **bench_train.VARIANTS[path])
        _, step = bench_train.make_step(cfg, PARITY_BATCH, device, BF16)
        accepted = backends_accepted(step)
        rows.append({"path": path, "default": backends_used(step), "accepted": accepted,
                     "fused": any(b in accepted for b in FUSED)})
    return rows


def datasheet_peak(device_name: str) -> float | None:
    """FLOP/s of the device's dense bf16 tensor cores, where the table knows it."""
    return next((tflops * 1e12 for key, tflops in BF16_PEAK_TFLOPS if key in device_name), None)


def train_steps(preset: ModelConfig, device: torch.device, batch: int) -> dict[str, Any]:
    """bench_train's step (mask + forward + ELBO + backward) of each variant, interleaved."""
    seq = preset.block_size
    models, steps = {}, {}
    for name, options in bench_train.VARIANTS.items():
        cfg = dataclasses.replace(preset, **options)
        models[name], steps[name] = bench_train.make_step(cfg, batch, device, BF16)
    samples = common.time_interleaved(steps, STEP_REPEATS, STEP_WARMUP, device)
    measured = common.matmul_peak_flops(device, BF16, size=MATMUL_SIZE[device.type])
    sheet = datasheet_peak(common.machine(device)) if device.type == "cuda" else None
    rows = []
    for name, times in samples.items():
        stats = common.Stats.of(times)
        flops = bench_train.train_flops(models[name], batch, seq) / stats.median
        rows.append({"variant": name, "step": stats.to_dict(), "tokens_per_s": batch * seq / stats.median,
                     "flops_per_s": flops, "mfu_measured": flops / measured,
                     "mfu_datasheet": None if sheet is None else flops / sheet})
    del models, steps
    return {"seq": seq, "batch": batch, "matmul_peak_flops": measured, "datasheet_peak_flops": sheet, "rows": rows}


def sampler(preset: ModelConfig, device: torch.device) -> dict[str, Any]:
    """Full recompute vs dual cache + threshold, random sink model, bf16 autocast."""
    prompt, block = bench_generate.PROMPT_LEN, bench_generate.BLOCK
    gen_length = min(GEN_LENGTH, (preset.block_size - prompt) // block * block)
    torch.manual_seed(0)
    with device:
        model = DLM(dataclasses.replace(preset, sink_tokens=1)).eval()
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(1, preset.require_vocab(), (GEN_BATCH, prompt), generator=gen).tolist()
    base = SampleConfig(gen_length=gen_length, steps=gen_length, block_length=block, eos="fill")
    settings = {"full recompute": (base, False),
                f"dual cache + threshold {THRESHOLD}": (base.replace(cache="dual", threshold=THRESHOLD), True)}
    rows = []
    for name, (cfg, sink_cache) in settings.items():
        seconds = []
        for _ in range(GEN_REPEATS):
            with torch.autocast(device.type, dtype=BF16):
                elapsed, calls, _ = bench_generate.run_once(model, [prompts], cfg, sink_cache, bench_generate.EOS)
            seconds.append(elapsed)
        stats = common.Stats.of(seconds)
        rows.append({"setting": name, "seconds": stats.to_dict(), "forward_calls": calls,
                     "tokens_per_s": len(prompts) * gen_length / stats.median})
    return {"gen_length": gen_length, "batch": len(prompts), "rows": rows}


def fsdp_round_trip(preset: ModelConfig, device: torch.device) -> dict[str, Any]:
    """One FSDP2 step set up as the trainer does (bf16-mixed, activation checkpointing), a sharded
    save, and a load into a fresh model: the weights must come back bit for bit."""
    from sinkdlm.training.objective import diffusion_loss
    from sinkdlm.training.trainer import build, full_weights, make_fabric

    t = TrainConfig(accelerator=device.type, devices=1, strategy="fsdp", precision="bf16-mixed",
                    activation_checkpointing=True, micro_batch=1, global_batch=1)
    cfg = Config(model=dataclasses.replace(preset, sink_tokens=1), train=t)
    fabric = make_fabric(t)
    fabric.launch()
    model, optimizer = build(cfg, fabric, None)
    ids = torch.randint(preset.require_vocab(), (1, preset.block_size), device=fabric.device)
    started = time.perf_counter()
    loss = diffusion_loss(model, cfg, ids, None, 0, [0])
    fabric.backward(loss)
    optimizer.step()
    common.synchronize(device)
    step_s = time.perf_counter() - started
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "sharded"
        started = time.perf_counter()
        fabric.save(path, {"model": model, "optimizer": optimizer})
        save_s = time.perf_counter() - started
        cfg.train.seed = FSDP_SEED  # a differently initialised model to load into
        fresh, fresh_optimizer = build(cfg, fabric, None)
        started = time.perf_counter()
        fabric.load(path, {"model": fresh, "optimizer": fresh_optimizer}, weights_only=True)
        load_s = time.perf_counter() - started
        shards = len(list(path.glob("*.distcp")))
    saved, loaded = full_weights(model.module), full_weights(fresh.module)
    exact = saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)
    return {"loss": loss.item(), "step_s": step_s, "save_s": save_s, "load_s": load_s, "shards": shards,
            "round_trip_exact": exact}


# ---------------------------------------------------------------------------------------------
# the report


def options_label(options: dict[str, Any]) -> str:
    return ModelConfig(**options).variant()


def report(result: dict[str, Any]) -> str:
    parity_rows = result["parity"]
    worst = sorted(parity_rows, key=lambda r: -r["relative_error"])[:5]
    steps, gen, fsdp = result["train_steps"], result["sampler"], result["fsdp"]
    sheet = steps["datasheet_peak_flops"]
    lines = [
        f"## GPU check: {result['machine']}, preset {result['preset']}",
        "",
        f"torch {result['torch']}; {result['seconds']:.0f} s in all; checks {'PASSED' if result['ok'] else 'FAILED'}.",
        "",
        f"### Fast == reference, bf16 autocast ({len(parity_rows)} cases: {len(SINK_OPTIONS)} sink options x "
        f"padding or not; tolerance max|fast - ref| / max|ref| <= {PARITY_TOLERANCE})",
        "",
        common.markdown_table(["sink options (worst 5)", "padded", "relative error", "ok"],
                              [[options_label(r["options"]), str(r["padded"]), f"{r['relative_error']:.2e}",
                                "yes" if r["ok"] else "NO"] for r in worst]),
        "",
        "### SDPA backends (training setting: no padding, bf16, forward + backward)",
        "",
        common.markdown_table(["path", "default dispatch", "accepted alone (sdpa_kernel)", "fused kernel"],
                              [[r["path"], ", ".join(r["default"]) or "-", ", ".join(r["accepted"]),
                                "yes" if r["fused"] else "NO"] for r in result["sdpa"]]),
        "",
        f"### Train step: batch {steps['batch']} x {steps['seq']} tokens, bf16 autocast, "
        f"{STEP_REPEATS} interleaved rounds after {STEP_WARMUP} warm-up",
        "",
        f"Measured bf16 matmul peak {steps['matmul_peak_flops'] / 1e12:.1f} TFLOP/s "
        f"({MATMUL_SIZE[result['device_type']]}^2, best of {common.MATMUL_REPEATS}); data-sheet peak "
        + (f"{sheet / 1e12:.1f} TFLOP/s." if sheet else "unknown for this device."),
        "",
        common.markdown_table(
            ["variant", "step ms (median)", "min-max ms", "tokens/s", "TFLOP/s", "MFU (measured peak)",
             "MFU (data sheet)"],
            [[r["variant"], f"{r['step']['median'] * 1e3:.1f}",
              f"{r['step']['min'] * 1e3:.1f}-{r['step']['max'] * 1e3:.1f}", f"{r['tokens_per_s']:,.0f}",
              f"{r['flops_per_s'] / 1e12:.2f}", f"{r['mfu_measured']:.1%}",
              "-" if r["mfu_datasheet"] is None else f"{r['mfu_datasheet']:.1%}"] for r in steps["rows"]]),
        "",
        f"### Sampler: random sink model, {gen['batch']} prompts, {gen['gen_length']} tokens, one per step",
        "",
        common.markdown_table(["setting", "seconds (median)", "tokens/s", "forward calls"],
                              [[r["setting"], f"{r['seconds']['median']:.2f}", f"{r['tokens_per_s']:,.0f}",
                                str(r["forward_calls"])] for r in gen["rows"]]),
        "",
        "### FSDP2 on one device (bf16-mixed, activation checkpointing)",
        "",
        common.markdown_table(["step s", "sharded save s", "sharded load s", "shard files", "round trip exact"],
                              [[f"{fsdp['step_s']:.2f}", f"{fsdp['save_s']:.2f}", f"{fsdp['load_s']:.2f}",
                                str(fsdp["shards"]), "yes" if fsdp["round_trip_exact"] else "NO"]]),
    ]
    return "\n".join(lines)


def all_ok(result: dict[str, Any]) -> bool:
    """Parity holds, the fast sink path runs a fused kernel (the dense path is the oracle: it may
    fall back to math), and the sharded round trip is exact."""
    fast_fused = all(r["fused"] for r in result["sdpa"] if r["path"] == "sink-fast")
    return all(r["ok"] for r in result["parity"]) and fast_fused and result["fsdp"]["round_trip_exact"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", help="cuda | cuda:N | cpu")
    ap.add_argument("--preset", default="472", help="a model preset (tiny for a CPU smoke run)")
    ap.add_argument("--batch", type=int, default=STEP_BATCH,
                    help="sequences per timed train step (lower it if the GPU runs out of memory)")
    ap.add_argument("--out", default="runs/gpu-check", help="folder for gpu_check.md and gpu_check.json")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    preset = model_preset(args.preset)
    if preset.vocab_size is None:  # the CPU presets leave it to the data
        preset = model_preset(args.preset, vocab_size=SMDM_VOCAB)
    started = time.perf_counter()
    result: dict[str, Any] = {"machine": common.machine(device), "device_type": device.type,
                              "torch": torch.__version__, "preset": args.preset}
    result["parity"] = parity(preset, device)
    result["sdpa"] = sdpa_kernels(preset, device)
    result["train_steps"] = train_steps(preset, device, args.batch)
    result["sampler"] = sampler(preset, device)
    result["fsdp"] = fsdp_round_trip(preset, device)
    result["seconds"] = time.perf_counter() - started
    result["ok"] = all_ok(result)
    text = report(result)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.md").write_text(text + "\n")
    (out / "gpu_check.json").write_text(json.dumps(result, indent=2))
    print(text)
    print(f"\nwritten: {out / 'gpu_check.md'}, {out / 'gpu_check.json'}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
