"""The per-GPU memory estimate: exact model-state accounting against a real trainer, its scaling, the CLI."""

import json
import math
import os
import socket
import subprocess
import sys
import textwrap

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
    if recipe == "self-forcing":  # the real score is frozen: weights only, whole with one process
        assert ("real_score", "moments") not in measured and ("real_score", "weights") in estimated


TWO_RANKS = textwrap.dedent("""
    import json, sys, tempfile
    from torch.distributed.tensor import DTensor
    from tether.train import Trainer
    from tether.train.config import load_config

    cfg = load_config("self-forcing", overrides=json.loads(sys.argv[1]))
    trainer = Trainer(cfg, tempfile.mkdtemp(), progress=False)
    trainer.recipe.setup()
    for step in range(2):  # generator_every=1: the real score scores, the critic trains
        trainer.recipe.step(step)
    local = lambda p: p._local_tensor if isinstance(p, DTensor) else p
    if trainer.rank == 0:
        out = {}
        for name, model in trainer.models.items():
            params = dict(model.named_parameters())
            out[name] = {"bytes": sum(local(p).numel() * local(p).element_size() for p in params.values()),
                         "root_gathered": all(not isinstance(p, DTensor) for n, p in params.items() if not n.startswith("blocks.")),
                         "blocks_sharded": all(isinstance(p, DTensor) for n, p in params.items() if n.startswith("blocks."))}
        open(sys.argv[2], "w").write(json.dumps(out))
""")


def test_two_ranks_hold_the_estimated_shards_of_trained_and_frozen_models(tmp_path):
    """A real 2-process FSDP2 trainer (CPU, gloo, fp32): each model's rank-0 bytes after two steps, exactly."""
    overrides = TINY + ["generator_every=1"]
    (tmp_path / "worker.py").write_text(TWO_RANKS)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
                          str(tmp_path / "worker.py"), json.dumps(overrides), str(tmp_path / "out.json")],
                         capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    measured = json.loads((tmp_path / "out.json").read_text())
    est = me.estimate(load_config("self-forcing", overrides=overrides), world_size=2, mixed_precision=False,
                      default_config=CONFIGS["tiny"])
    state = {i.what: i.bytes for i in est.phases[-1].items}
    assert est.models["real_score"]["sharded"] and "real_score weights, fp32 (frozen, sharded 1/2)" in state
    root_shapes = [s for n, s, _ in me.parameter_shapes(CONFIGS["tiny"]) if not n.startswith("blocks.")]
    gathered_root = 4 * sum(math.prod(s) for s in root_shapes) - 4 * sum(me.shard_numel(s, 2) for s in root_shapes)
    # the frozen score: no backward ever reshards its root after its forward; the generator: its gradient-free
    # rollout for the critic leaves its root gathered until its own next backward; the critic: resharded by its backward
    assert {name: got["root_gathered"] for name, got in measured.items()} == \
        {"generator": True, "real_score": True, "critic": False}
    assert state["real_score: root weights left all-gathered after its first forward (fp32)"] == \
        4 * sum(math.prod(s) for s in root_shapes)
    critic_phase = {i.what for i in next(p for p in est.phases if p.name == "critic forward + backward").items}
    assert "generator: root weights still gathered after the critic's rollout (fp32)" in critic_phase
    for name, got in measured.items():
        assert got["blocks_sharded"], name
        weights = next(b for what, b in state.items() if what.startswith(f"{name} weights"))
        assert got["bytes"] == weights + (gathered_root if got["root_gathered"] else 0), name


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
    # the frozen 14B real score is sharded like the trained models (Trainer.add_model): bf16, 1/world per rank
    score = CONFIGS["wan2.1-t2v-14b"]
    frozen_small = items(small, "real_score weights, bf16 (frozen, sharded 1/16)")
    frozen_large = items(large, "real_score weights, bf16 (frozen, sharded 1/32)")
    assert len(frozen_small) == len(frozen_large) == 1
    (small_bytes,), (large_bytes,) = frozen_small.values(), frozen_large.values()
    assert small_bytes == 2 * me.count(me.ModelPlan("r", score, False), 16).shard_total
    assert large_bytes == pytest.approx(small_bytes / 2, rel=0.01)
    whole = 2 * me.count(me.ModelPlan("r", score, False), 1).total
    assert small_bytes == pytest.approx(whole / 16, rel=0.01)
    # while it scores, each rank also holds two of its blocks all-gathered (and its root, gathered since its first
    # forward); it has no gradients
    scoring = {i.what: i.bytes for i in next(p for p in large.phases if p.name == "generator DMD scoring").items}
    block = me.count(me.ModelPlan("r", score, False), 32).block
    assert scoring["real_score: all-gathered bf16 weights (2 blocks)"] == 2 * 2 * block
    assert not any(what.startswith("real_score gradients") for what in items(large, "real_score"))
    # one process: whole
    single = items(me.estimate(wan("self-forcing"), 1), "real_score weights")
    assert list(single.values()) == [whole] and "real_score weights, bf16 (frozen, whole)" in single


def test_setup_moves_a_frozen_score_already_cast_and_a_trained_model_in_fp32():
    score = me.count(me.ModelPlan("r", CONFIGS["wan2.1-t2v-14b"], False), 1).total
    setup = next(p for p in me.estimate(wan("self-forcing"), 64).phases if p.name == "setup")
    moved = [i for i in setup.items if "moved to the GPU" in i.what]
    assert [i.what for i in moved] == ["real_score: whole bf16 (cast on the CPU) copy moved to the GPU before sharding"]
    assert moved[0].bytes == 2 * score  # no fp32 copy of the 14B score on the GPU any more
    teacher = next(p for p in me.estimate(wan("teacher"), 8).phases if p.name == "setup")
    model = me.count(me.ModelPlan("m", CONFIGS["wan2.1-t2v-1.3b"], True), 8).total
    assert any(i.what == "model: whole fp32 copy moved to the GPU before sharding" and i.bytes == 4 * model
               for i in teacher.items)


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
    assert sf.models["real_score"]["config"] == "wan2.1-t2v-14b" and sf.models["real_score"]["sharded"]
    assert sf.models["real_score"]["role"] == "frozen" and sf.models["real_score"]["trainable"] == 0
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
