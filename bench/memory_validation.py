"""How close `tether.train.memory_estimate` comes to what a real step allocates, on CPU.

    OMP_NUM_THREADS=1 python bench/memory_validation.py --json bench/results/memory_validation_toy_cpu.json

No GPU: the steps run on CPU (fp32, one process, no FSDP), and the peak is read from
torch.profiler's memory events (every allocation and free, in order): the highest level of
live bytes above the level at the start of the step. That is compared with the estimate's
step-time part for the same config (`mixed_precision=False`, world size 1): activations, KV
cache and views, and the gradients, i.e. everything but the model state that exists before
the step. The optimiser step is left out of both (its moments exist from the first step on).

A second check counts, for one bf16 block, the bytes of the tensors autograd saves (saved-
tensor hooks) against the estimate's per-token count, and the block's forward+backward peak
against `BACKWARD_FACTOR` times that.

On CPU, a step also allocates what a GPU run keeps on the host (synthetic batches, the
error bank), so cf-teacher's bank is allocated before the profiled step.
"""

import argparse
import json

import torch
from torch.profiler import ProfilerActivity, profile

from tether.configs import CONFIGS
from tether.train import Trainer
from tether.train import memory_estimate as me
from tether.train.config import load_config
from tether.train.dmd import dmd_loss

MIB = 2 ** 20


def peak_bytes(fn) -> int:
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.time_range.start, e.self_cpu_memory_usage) for e in prof.events() if e.self_cpu_memory_usage)
    live = peak = 0
    for _, size in events:
        live += size
        peak = max(peak, live)
    return peak


def step_part(phase) -> int:
    """The estimate's bytes of a phase that a step allocates: activations, KV, gradients."""
    return sum(i.bytes for i in phase.items if i.kind in ("activations", "kv") or "gradients" in i.what)


def run_step(recipe, model, latent, frames, tmp, backward=True) -> dict:
    overrides = [f"model.source={model}", f"data.frames={frames}", f"data.height={latent}", f"data.width={latent}",
                 "batch_size=1", "activation_checkpointing=true", "steps=1", "ema=0.9"]
    cfg = load_config(recipe, overrides=overrides)
    trainer = Trainer(cfg, f"{tmp}/{recipe}", progress=False)
    trainer.recipe.setup()
    torch.manual_seed(0)
    r = trainer.recipe
    if recipe in me.DMD_RECIPES:
        def fn():
            plan = r.plan(0, 0, "generator")
            plan.exit_step = r.rollout.num_steps - 1  # the longest rollout
            window, segments, real, fake = r.scored(plan, grad=True)
            timesteps, noise = r.score_draws(plan.draws, window)
            loss, _ = dmd_loss(window, real, fake, timesteps, noise, r.guidance, segments)
            if backward:
                loss.backward()
        names = ("generator rollout", "generator DMD scoring") + (("generator backward",) if backward else ())
    else:
        trainer.optimizer_step = lambda name, step: 0.0
        r.step(0)  # allocates cf-teacher's error bank (host memory on a GPU run)
        for p in r.model.parameters():
            p.grad = None
        fn = lambda: r.step(1)  # noqa: E731
        names = ("model forward + backward", "model end of backward")
    measured = peak_bytes(fn)
    est = me.estimate(cfg, 1, mixed_precision=False, default_config=CONFIGS[model])
    estimated = max(step_part(p) for p in est.phases if p.name in names)
    return {"recipe": recipe, "model": model, "latent": f"{latent}x{latent}", "frames": frames,
            "backward": backward, "measured_mib": round(measured / MIB, 2), "estimated_mib": round(estimated / MIB, 2),
            "estimate_over_measured": round(estimated / measured, 3)}


def block_check(dtype=torch.bfloat16) -> dict:
    from tether.model.rope import Rope3D
    from tether.model.transformer import AttentionPlan, WanBlock

    torch.manual_seed(0)
    cfg = CONFIGS["toy"]
    block = WanBlock(cfg).to(dtype)
    block.norm3.float()
    frames, grid = 6, (8, 8)
    tokens = frames * grid[0] * grid[1]
    x = torch.randn(1, frames, tokens // frames, cfg.dim, dtype=dtype, requires_grad=True)
    e = torch.randn(1, frames, 6, cfg.dim, dtype=dtype)
    text = torch.randn(1, cfg.text_len, cfg.dim, dtype=dtype)
    cos, sin = Rope3D(cfg.head_dim, cfg.rope_theta).cos_sin(torch.arange(frames), *grid)
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    def fn():
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = block(x, e, text, AttentionPlan(cos, sin), 0)
        y.float().sum().backward()

    peak = peak_bytes(fn)
    params = list(block.parameters())
    for p in [*params, x]:
        storages.pop(p.untyped_storage().data_ptr(), None)
    saved = sum(storages.values())
    weight_grads = sum(p.numel() * p.element_size() for p in params)
    counted = me.block_grad_working_bytes(cfg, tokens, tokens, 1, 2 if dtype == torch.bfloat16 else 4) / me.BACKWARD_FACTOR
    return {"block": "toy (dim 256, ffn 1024)", "tokens": tokens, "dtype": str(dtype).replace("torch.", ""),
            "saved_mib": round(saved / MIB, 3), "counted_mib": round(counted / MIB, 3),
            "saved_over_counted": round(saved / counted, 3),
            "backward_peak_over_saved": round((peak - weight_grads) / saved, 3),
            "backward_factor_used": me.BACKWARD_FACTOR}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--json")
    p.add_argument("--tmp", default="/tmp/tether-memory-validation")
    args = p.parse_args()
    torch.set_num_threads(1)
    rows = [run_step("self-forcing", "toy", 16, 21, args.tmp),
            run_step("self-forcing", "toy", 16, 21, args.tmp, backward=False),
            run_step("cf-stage2", "toy", 8, 21, args.tmp),
            run_step("gf-stage1", "toy", 16, 21, args.tmp),
            run_step("teacher", "toy", 16, 21, args.tmp),
            run_step("cf-teacher", "toy", 16, 42, args.tmp)]
    blocks = [block_check(torch.bfloat16), block_check(torch.float32)]
    for row in rows + blocks:
        print(row)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": "cpu", "note": __doc__.strip().splitlines()[0], "steps": rows, "blocks": blocks}, f, indent=2)


if __name__ == "__main__":
    main()
