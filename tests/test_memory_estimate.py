"""The per-GPU memory estimate: exact model-state accounting against a real trainer, its scaling, the CLI."""

import json

import pytest
import torch

from tether.cli import main
from tether.configs import CONFIGS
from tether.train import Trainer
from tether.train import memory_estimate as me
from tether.train.config import load_config

TINY = ["model.source=tiny", "data.frames=6", "data.height=4", "data.width=4", "batch_size=2", "ema=0.9", "steps=1"]
LORA = "lora={rank: 4, alpha: 4, target_modules: [q, k, v, o]}"


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def measured_state(trainer, grads: dict) -> dict:
    """Bytes per (model, what) of the trainer's real tensors after one step."""
    out = {}
    for name, model in trainer.models.items():
        out[(name, "weights")] = nbytes(model.parameters())
    for name, opt in trainer.optimizers.items():
        out[(name, "moments")] = nbytes(t for state in opt.state.values() for key, t in state.items() if key != "step")
    for name, ema in trainer.emas.items():
        out[(name, "ema")] = nbytes(ema.shadow.values())
    for name, size in grads.items():
        out[(name, "gradients")] = size
    return out


def estimated_state(est) -> dict:
    out = {}
    for phase in est.phases:
        for item in phase.items:
            name = item.what.split(" ")[0]
            for key, what in (("weights", "weights"), ("AdamW moments", "moments"), ("EMA", "ema"),
                              ("gradients, fp32", "gradients")):
                if item.what.startswith(f"{name} {key}"):
                    out[(name, what)] = item.bytes
    return out


@pytest.mark.parametrize("recipe,extra", [("teacher", []), ("self-forcing", []), ("cf-teacher", [LORA])])
def test_model_state_bytes_match_a_real_trainer_exactly(tmp_path, one_thread, recipe, extra):
    cfg = load_config(recipe, overrides=TINY + extra)
    trainer = Trainer(cfg, tmp_path / recipe, progress=False)
    grads = {}
    step = trainer.optimizer_step

    def recording_step(name, at):  # gradients exist only between backward and the optimiser step
        grads[name] = nbytes(p.grad for p in trainer._optimizer_model[name].parameters() if p.grad is not None)
        return step(name, at)

    trainer.optimizer_step = recording_step
    trainer.run()
    measured = measured_state(trainer, grads)
    estimated = estimated_state(me.estimate(cfg, world_size=1, mixed_precision=False, default_config=CONFIGS["tiny"]))
    assert set(measured) <= set(estimated)
    for key, size in measured.items():
        assert estimated[key] == size, key
    if recipe == "cf-teacher":  # LoRA: the base is frozen inside the trained model, the adapters alone step
        assert 0 < measured[("model", "moments")] < measured[("model", "weights")] / 4
    if recipe == "self-forcing":  # the real score is frozen: weights only, whole on every rank
        assert ("real_score", "moments") not in measured and ("real_score", "weights") in estimated


def test_fsdp_shards_split_dim_zero_like_fully_shard():
    assert me.shard_numel((10, 3), 4) == 3 * 3  # ceil(10 / 4) rows on rank 0
    assert me.shard_numel((1, 6, 8), 64) == 48  # fewer rows than ranks: rank 0 holds them all
    assert me.shard_numel((7,), 1) == 7


def wan(recipe, *overrides):
    return load_config(recipe, scale="wan1.3b", overrides=list(overrides))


def items(est, kind_or_text):
    return {i.what: i.bytes for p in est.phases for i in p.items if kind_or_text in i.what}


def test_sharded_state_halves_when_the_world_doubles():
    small, large = me.estimate(wan("self-forcing"), 16), me.estimate(wan("self-forcing"), 32)
    for what, size in items(small, "sharded 1/16").items():
        halved = items(large, "sharded 1/32")[what.replace("1/16", "1/32")]
        assert halved == pytest.approx(size / 2, rel=0.01), what
    # the frozen 14B real score is not sharded: every rank holds all of it, whatever the world size
    frozen = items(small, "real_score weights")
    assert frozen == items(large, "real_score weights")
    assert list(frozen.values())[0] == 2 * me.count(me.ModelPlan("r", CONFIGS["wan2.1-t2v-14b"], False), 1).total


def test_accumulation_does_not_change_the_peak_beyond_the_first_unsharded_gradient_copy():
    peaks = {a: me.estimate(wan("cf-stage2"), 8, accumulation=a).peak.bytes for a in (1, 2, 8)}
    assert peaks[2] == peaks[8]
    generator = me.count(me.ModelPlan("g", CONFIGS["wan2.1-t2v-1.3b"], True), 8).trainable
    assert peaks[2] - peaks[1] == 4 * generator  # FSDP2 keeps unsharded fp32 grads between micro-batches
    one_gpu = {a: me.estimate(wan("teacher"), 1, accumulation=a).peak.bytes for a in (1, 8)}
    assert one_gpu[1] == one_gpu[8]


def test_more_grad_frames_and_longer_clips_need_more_activation_memory():
    def activations(est):
        phase = est.peak_training
        return sum(i.bytes for i in phase.items if i.kind in ("activations", "kv"))

    base = me.estimate(wan("self-forcing"), 64)
    more = me.estimate(wan("self-forcing", "data.frames=42", "rollout.grad_frames=42"), 64)
    assert activations(more) > activations(base)
    short = me.estimate(wan("teacher", "data.frames=9"), 8)
    assert activations(short) < activations(me.estimate(wan("teacher"), 8))


def test_the_reference_setups_are_counted_as_the_code_runs_them():
    sf = me.estimate(wan("self-forcing"), 64)
    assert sf.models["real_score"]["config"] == "wan2.1-t2v-14b" and not sf.models["real_score"]["sharded"]
    assert sf.assumptions["tokens_per_latent_frame"] == 1560
    assert any("attention views kept for backward (7 grad chunks" in what for what in items(sf, "views"))
    teacher = me.estimate(wan("cf-teacher"), 8, accumulation=8)
    assert teacher.models["model"]["lora_rank"] == 128
    assert teacher.models["model"]["trainable"] == 30 * 8 * 128 * (1536 + 1536)  # q, k, v, o of both attentions
    assert teacher.assumptions["cf_teacher_layout_frames"] == 42


def test_block_activation_count_matches_what_autograd_saves(one_thread):
    """The per-token count behind the recompute working set, against the tensors a bf16 block really saves."""
    from tether.model.rope import Rope3D
    from tether.model.transformer import AttentionPlan, WanBlock

    torch.manual_seed(0)
    cfg = CONFIGS["toy"]
    block = WanBlock(cfg).to(torch.bfloat16)
    block.norm3.float()  # autocast runs LayerNorm in fp32 on the GPU
    frames, grid = 6, (8, 8)
    tokens = frames * grid[0] * grid[1]
    x = torch.randn(1, frames, tokens // frames, cfg.dim, dtype=torch.bfloat16, requires_grad=True)
    cos, sin = Rope3D(cfg.head_dim, cfg.rope_theta).cos_sin(torch.arange(frames), *grid)
    text = torch.randn(1, cfg.text_len, cfg.dim, dtype=torch.bfloat16)
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        block(x, torch.randn(1, frames, 6, cfg.dim, dtype=torch.bfloat16), text, AttentionPlan(cos, sin), 0)
    for p in [*block.parameters(), x]:
        storages.pop(p.untyped_storage().data_ptr(), None)
    saved = sum(storages.values())
    counted = me.block_grad_working_bytes(cfg, tokens, tokens, 1, 2) / me.BACKWARD_FACTOR
    assert saved == pytest.approx(counted, rel=0.15)


def test_cli_prints_the_breakdown_and_writes_json(tmp_path, capsys):
    out = tmp_path / "sf.json"
    assert main(["train", "self-forcing", "--scale", "wan1.3b", "--estimate-memory", "--nproc", "64", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "COMPUTED, not measured" in printed and "peak phase" in printed and "80 GB" in printed
    result = json.loads(out.read_text())
    assert result["world_size"] == 64 and result["global_batch"] == 64 and result["computed_not_measured"]
    assert result["peak_gib"] == pytest.approx(max(p["total_gib"] for p in result["phases"]), abs=0.01)
    assert result["models"]["real_score"]["config"] == "wan2.1-t2v-14b"
    assert set(result["verdicts"]) == set(me.GPUS)
    assert main(["train", "cf-stage2", "accumulation=8", "--scale", "wan1.3b", "--estimate-memory", "--nproc", "8"]) == 0
    assert "8 GPU(s) x accumulation 8" in capsys.readouterr().out
    assert main(["train", "vae", "--estimate-memory"]) == 2
