"""DMD and the Self-Forcing rollout: the gradient by hand, where gradients flow, rank-shared draws, schedules, APR."""

import json

import pytest
import torch

from tether.checkpoints import load_transformer
from tether.memory import make_policy
from tether.memory.apr import AsymmetricProximityRecache
from tether.memory.dual import DualMemory
from tether.train import Trainer
from tether.train.config import load_config
from tether.train.dmd import (dmd_generator_loss, dmd_gradient, dmd_timesteps, guided_x0, per_segment, score_sources,
                              trains_generator)
from tether.train.recipes.ode_init import OdeInit, ode_timesteps, teacher_trajectory
from tether.train.rollout import SelfForcingRollout, Switch, draw_exit_step, segments_from

TINY = ["model.source=tiny", "data.frames=6", "data.height=4", "data.width=4", "batch_size=2", "ema=0.9"]


def tiny_trainer(recipe, out, *extra):
    return Trainer(load_config(recipe, overrides=TINY + list(extra)), out, progress=False)


# ---- the DMD gradient and loss ------------------------------------------------------
def test_dmd_gradient_by_hand_and_the_loss_carries_it_to_x():
    # sample 0: |x - real| = [1, 2], mean 1.5; fake - real = [3, -3]  -> grad [2, -2]
    # sample 1: |x - real| = [2, 2], mean 2;   fake - real = [-1, 1]  -> grad [-0.5, 0.5]
    x = torch.tensor([[1.0, 3.0], [0.0, 0.0]]).view(2, 1, 1, 1, 2).requires_grad_()
    real = torch.tensor([[0.0, 1.0], [2.0, -2.0]]).view(2, 1, 1, 1, 2)
    fake = torch.tensor([[3.0, -2.0], [1.0, -1.0]]).view(2, 1, 1, 1, 2)
    grad = dmd_gradient(x, real, fake)
    assert torch.allclose(grad.flatten(), torch.tensor([2.0, -2.0, -0.5, 0.5]))
    loss = dmd_generator_loss(x, grad)
    assert loss.item() == pytest.approx(0.5 * (4 + 4 + 0.25 + 0.25) / 4)
    loss.backward()
    # d/dx 0.5 * mean((x - stopgrad(x - grad))^2) = grad / numel: a descent step moves x along -grad,
    # away from the critic's reconstruction and towards the teacher's
    assert torch.allclose(x.grad * x.numel(), grad)


def test_dmd_timesteps_are_shifted_and_clamped():
    t = dmd_timesteps(torch.Generator().manual_seed(0), 4000, shift=5.0)
    assert t.min() >= 20 and t.max() <= 980
    assert t.median() > 700  # shift 5 maps the uniform median 500 to 833


class FlowOfText:
    """A stand-in denoiser whose flow is the text's mean: cond and uncond differ in a known way."""

    def forward_bidirectional(self, noisy, timesteps, text):
        return torch.ones_like(noisy) * text.mean(dim=(1, 2)).view(-1, 1, 1, 1, 1)


def test_real_score_guidance_in_self_forcings_form():
    noisy = torch.zeros(1, 1, 2, 1, 1)
    t = torch.tensor([500.0])
    text = torch.full((1, 3, 2), 2.0)  # flow 2 under the prompt, 0 without it
    x0 = guided_x0(FlowOfText(), noisy, t, text, guidance=3.0)
    cond, uncond = -0.5 * 2.0, 0.0
    assert torch.allclose(x0, torch.full_like(x0, cond + 3.0 * (cond - uncond)))


def test_each_frame_is_scored_under_its_own_prompt():
    noisy = torch.zeros(1, 1, 6, 1, 1)
    a, b = torch.full((1, 2, 2), 1.0), torch.full((1, 2, 2), 5.0)
    out = per_segment(lambda z, text: FlowOfText().forward_bidirectional(z, None, text), noisy, [(0, a), (4, b)])
    assert out.flatten().tolist() == [1, 1, 1, 1, 5, 5]
    kept = segments_from([(0, "a"), (6, "b"), (12, "c")], 9)
    assert kept == [(0, "b"), (3, "c")]


def test_scores_follow_the_student_unless_named():
    assert score_sources({"model": {"source": "tiny"}}) == ("tiny", "tiny")
    assert score_sources({"model": {"source": "tiny"}, "teacher": {"source": "t.safetensors"}}) == ("t.safetensors",) * 2
    cfg = {"model": {"source": "s"}, "teacher": {"source": "t"}, "critic": {"source": "c"}}
    assert score_sources(cfg) == ("t", "c")


def test_no_dmd_gradient_while_the_critic_is_the_unguided_teacher(tmp_path):
    # tiny teacher and tiny critic are the same seeded weights: the fake score equals the real one
    trainer = tiny_trainer("self-forcing", tmp_path / "run", "guidance=0")
    trainer.recipe.setup()
    metrics = trainer.recipe.generator_step(0)
    assert metrics["dmd_grad"] == 0 and metrics["generator_loss"] == 0
    guided = tiny_trainer("self-forcing", tmp_path / "guided", "guidance=3.0")
    guided.recipe.setup()
    assert guided.recipe.generator_step(0)["dmd_grad"] > 0


# ---- the rollout -----------------------------------------------------------------------
def spy_on_forwards(model):
    calls = []
    original = model.forward_cached

    def forward_cached(latents, timestep, text, query_positions, past=None, capture=False, chunk_size=None):
        calls.append({"t": float(timestep), "grad": torch.is_grad_enabled(), "commit": capture and chunk_size is None,
                      "first": query_positions[0]})
        return original(latents, timestep, text, query_positions, past=past, capture=capture, chunk_size=chunk_size)

    model.forward_cached = forward_cached
    return calls


def test_rollout_keeps_gradients_only_at_the_exit_step_of_the_last_21_frames():
    torch.manual_seed(0)
    model = load_transformer("tiny").float()
    calls = spy_on_forwards(model)
    rollout = SelfForcingRollout()
    g = torch.Generator().manual_seed(1)
    exit_step = 2
    result = rollout.run(model, make_policy("window", window=9), torch.randn(2, 16, 32),
                         lambda shape: torch.randn(shape, generator=g), 27, (4, 4, 4), exit_step)
    assert result.grad_start == 6  # 27 frames: the first two chunks are context only
    denoising = [c for c in calls if not c["commit"]]
    assert len(denoising) == 9 * (exit_step + 1) and sum(c["commit"] for c in calls) == 9
    exit_t = rollout.timesteps[exit_step]
    with_grad = [c for c in calls if c["grad"]]
    assert with_grad and all(c["t"] == exit_t and not c["commit"] for c in with_grad)
    assert sorted(c["first"] for c in with_grad) == list(range(6, 27, 3))

    params = list(model.parameters())
    early = torch.autograd.grad(result.latents[:, :, :6].sum(), params, allow_unused=True, retain_graph=True)
    assert all(g is None or not g.any() for g in early)
    late = torch.autograd.grad(result.latents[:, :, 6:].sum(), params, allow_unused=True)
    assert sum(float(g.abs().sum()) for g in late if g is not None) > 0


def test_exit_step_is_shared_across_ranks_and_batches_split_by_rank(tmp_path):
    ranks = [tiny_trainer("self-forcing", tmp_path / f"rank{r}") for r in range(2)]
    whole = tiny_trainer("self-forcing", tmp_path / "whole")
    for r, trainer in enumerate(ranks):
        trainer.recipe.setup()
        trainer.rank, trainer.world_size = r, 2
        trainer.recipe.batch_size = 1
    whole.recipe.setup()
    exits = set()
    for step in range(12):
        draws = [draw_exit_step(t.shared_generator(step, "generator", 0), 4) for t in ranks]
        assert draws[0] == draws[1]
        exits.add(draws[0])
        plans = [t.recipe.plan(step, 0, "generator") for t in ranks]
        one = whole.recipe.plan(step, 0, "generator")
        assert plans[0].exit_step == plans[1].exit_step == one.exit_step
        assert torch.equal(torch.cat([p.text for p in plans]), one.text)
        noise = torch.cat([p.draws.noise((1, 4, 3, 4, 4)) for p in plans])
        assert torch.equal(noise, one.draws.noise((2, 4, 3, 4, 4)))
    assert len(exits) > 1  # drawn, not fixed
    assert not torch.equal(torch.randn(3, generator=ranks[0].generator(0, "x")), torch.randn(3, generator=ranks[1].generator(0, "x")))


# ---- the schedule -------------------------------------------------------------------------
def test_critic_every_step_generator_every_fifth(tmp_path):
    assert [s for s in range(12) if trains_generator(s, 5)] == [0, 5, 10]
    trainer = tiny_trainer("self-forcing", tmp_path / "run", "steps=6")
    trainer.run()
    lines = [json.loads(line) for line in open(tmp_path / "run" / "log.jsonl")]
    assert [("critic_grad_norm" in line) for line in lines] == [True] * 6
    assert [line["step"] for line in lines if "generator_loss" in line] == [0, 5]


def test_a_resumed_self_forcing_run_matches_an_uninterrupted_one(tmp_path):
    whole = tiny_trainer("self-forcing", tmp_path / "whole", "steps=4", "save_every=2", "generator_every=3")
    whole.run()
    tiny_trainer("self-forcing", tmp_path / "split", "steps=2", "save_every=2", "generator_every=3").run()
    second = Trainer(load_config("self-forcing", overrides=TINY + ["steps=4", "save_every=2", "generator_every=3"]),
                     tmp_path / "split", resume=True, progress=False)
    second.run()
    logs = [[json.loads(line) for line in open(tmp_path / run / "log.jsonl")] for run in ("whole", "split")]
    assert [(a["loss"], a.get("generator_loss")) for a in logs[0]] == [(b["loss"], b.get("generator_loss")) for b in logs[1]]
    for name in ("generator", "critic"):
        a, b = whole.weights(name), second.weights(name)
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_export_writes_the_ema_generator(tmp_path):
    trainer = tiny_trainer("self-forcing", tmp_path / "run", "steps=1")
    trainer.run()
    trainer.recipe.export(tmp_path / "out")
    exported = load_transformer(str(tmp_path / "out" / "transformer.safetensors")).state_dict()
    ema = trainer.weights("generator", ema=True)
    assert all(torch.equal(exported[k], ema[k].to(exported[k].dtype)) for k in ema)


# ---- Grounded Forcing stage 2 ------------------------------------------------------------
def test_gf_stage2_rollout_switches_prompts_through_apr(tmp_path, monkeypatch):
    applied = []
    original = AsymmetricProximityRecache.apply

    def spy(self, stream, text_ctx, cut=False):
        applied.append((type(stream.policy), len(stream.policy.local), cut))
        return original(self, stream, text_ctx, cut=cut)

    monkeypatch.setattr(AsymmetricProximityRecache, "apply", spy)
    trainer = tiny_trainer("gf-stage2", tmp_path / "run", "steps=1", "rollout.frames=[21,27]", "rollout.cut_probability=0")
    trainer.recipe.setup()
    plan = trainer.recipe.plan(0, 0, "generator")
    assert plan.switches and 21 <= plan.num_frames <= 27
    result = trainer.recipe.roll(plan, grad=True)
    # the dual memory is per video, so each of the 2 samples rolls out (and switches) on its own
    assert trainer.recipe.per_sample_memory and len(applied) == 2 * len(plan.switches)
    assert all(policy is DualMemory and local > 0 for policy, local, _ in applied)
    assert len(result.segments) == 1 + len(plan.switches)
    window, segments = result.window()
    assert window.shape[2] == 21 and window.requires_grad


def test_a_scene_cut_in_the_rollout_flushes_the_local_memory():
    model = load_transformer("tiny").float()
    g = torch.Generator().manual_seed(0)
    seen = []
    policy = make_policy("dual")
    original = policy.on_scene_cut
    policy.on_scene_cut = lambda: (seen.append(len(policy.local)), original())
    SelfForcingRollout(switch="apr").run(model, policy, torch.randn(1, 16, 32), lambda s: torch.randn(s, generator=g),
                                         12, (4, 4, 4), 0, switches=[Switch(2, torch.randn(1, 16, 32), cut=True)],
                                         grad=False)
    assert seen == [6] and len(policy.anchors) == 3


# ---- ODE init ----------------------------------------------------------------------------
def test_teacher_ode_records_the_student_steps_and_integrates_to_zero_noise():
    grid = ode_timesteps(8, 5.0, [1000.0, 937.5, 833.3333, 625.0])
    assert grid[0] == 1000.0 and grid[-1] == 0.0 and 625.0 in grid and grid == sorted(grid, reverse=True)
    noise = torch.randn(1, 1, 3, 1, 1)
    text = torch.full((1, 2, 2), 0.5)  # constant flow 0.5, so x0 = noise - 0.5
    states, x0 = teacher_trajectory(FlowOfText(), noise, text, grid, [1000.0, 625.0], guidance=1.0)
    assert torch.equal(states[0], noise)
    assert torch.allclose(states[1], noise - 0.375 * 0.5)
    assert torch.allclose(x0, noise - 0.5)


# ---- ranks --------------------------------------------------------------------------------
def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_for_a_switching_dual_memory_rollout(tmp_path):
    """Exit step, lengths, switches, per-sample noise and per-sample memory: 2 ranks x 1 == 1 rank x 2."""
    import os
    import subprocess
    import sys

    overrides = [*TINY[:-2], "ema=0.9", "data.frames=21", "steps=2", "rollout.frames=[21,30]"]
    tiny_trainer("gf-stage2", tmp_path / "one", *overrides[len(TINY) - 2:]).run()  # batch_size=2, in this process
    env = dict(os.environ, OMP_NUM_THREADS="1")
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          str(_free_port()), "-m", "tether", "train", "gf-stage2", *overrides, "batch_size=1", "--quiet",
                          "--device", "cpu", "--out", str(tmp_path / "two")],
                         capture_output=True, text=True, timeout=300, env=env)
    assert two.returncode == 0, two.stderr[-3000:]
    logs = [[json.loads(line) for line in open(tmp_path / run / "log.jsonl")] for run in ("one", "two")]
    assert len(logs[0]) == len(logs[1]) == 2
    for a, b in zip(*logs):
        for key in ("loss", "generator_loss", "dmd_grad"):
            if key in a:
                assert abs(a[key] - b[key]) < 1e-5 * max(1.0, abs(a[key])), (key, a, b)
    assert "generator_loss" in logs[1][0]


def test_each_chunk_of_the_student_input_comes_from_its_own_trajectory_state():
    states = torch.arange(4.0).view(4, 1, 1, 1, 1, 1).expand(4, 2, 3, 6, 2, 2)  # state s is filled with s
    per_frame = torch.tensor([[0, 0, 0, 3, 3, 3], [2, 2, 2, 1, 1, 1]])
    picked = OdeInit._pick(states, per_frame)
    assert picked.shape == (2, 3, 6, 2, 2)
    assert torch.equal(picked[:, 0, :, 0, 0], per_frame.float())


def test_ode_init_integrates_the_teacher_on_its_own_shift_and_still_stops_at_the_student_steps(tmp_path):
    from tether.schedule import timestep_grid, warp_steps

    recipe = tiny_trainer("ode-init", tmp_path / "run", "shift=1.0", "ode.shift=3.0", "ode.steps=8").recipe
    recipe.setup()
    student = warp_steps([1000, 750, 500, 250], 1.0)
    assert recipe.student_timesteps == student == [1000.0, 750.0, 500.0, 250.0]
    shifted = [round(float(t), 6) for t in timestep_grid(3.0, 8)]
    assert recipe.grid == sorted(set(shifted) | set(student), reverse=True)
    assert recipe.grid[1] == pytest.approx(1000 * 3 * 0.875 / (1 + 2 * 0.875))  # the first step is shifted: 954.5
    default = tiny_trainer("ode-init", tmp_path / "default", "shift=1.0", "ode.steps=8").recipe
    default.setup()
    assert default.grid == [1000.0 - 125.0 * k for k in range(9)]  # no ode.shift: the recipe's own shift


def test_ode_init_fits_a_fixed_pool_of_teacher_trajectories(tmp_path):
    trainer = tiny_trainer("ode-init", tmp_path / "run", "steps=30", "ode.pool=1", "ode.steps=8", "optimizer.lr=1e-3",
                           "optimizer.warmup=0")
    trainer.run()
    losses = [json.loads(line)["loss"] for line in open(tmp_path / "run" / "log.jsonl")]
    assert losses[-1] < losses[0] / 5


def test_the_rollout_refuses_a_policy_with_its_own_sampler():
    from tether.errors import TetherError

    with pytest.raises(TetherError, match="rolling"):
        SelfForcingRollout().run(load_transformer("tiny"), make_policy("rolling"), torch.randn(1, 16, 32),
                                 torch.randn, 6, (4, 4, 4), 0)


@pytest.mark.parametrize("name", ["full", "window", "frame-sink", "infinity-rope", "slow-fast", "dual"])
def test_every_one_chunk_policy_rolls_out_with_its_switch_rule_and_a_cut(name):
    g = torch.Generator().manual_seed(0)
    policy = make_policy(name)
    result = SelfForcingRollout(switch=policy.default_switch).run(
        load_transformer("tiny"), policy, torch.randn(1, 16, 32), lambda shape: torch.randn(shape, generator=g), 30,
        (4, 4, 4), 1, switches=[(5, torch.randn(1, 16, 32), True)])
    assert result.latents.shape[2] == 30 and torch.isfinite(result.latents).all() and result.latents.requires_grad
