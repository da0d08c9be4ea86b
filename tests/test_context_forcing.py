"""Context Forcing training pieces: ERFT's error bank and injection policy, the context teacher's layout."""

import json

import pytest
import torch

from tether.train import Trainer
from tether.train.config import load_config
from tether.train.error_bank import (ErrorBank, Injection, InjectionRates, draw_errors, draw_injection,
                                     timestep_bins)
from tether.train.recipes.cf_teacher import context_positions, plan_layout, smallest_full_window, teacher_inputs

TINY = ["model.source=tiny", "data.frames=6", "data.height=4", "data.width=4", "batch_size=2", "ema=0.9"]


def filled_bank(bins=50, capacity=4, shape=(2, 3, 3)):
    """Every bin of both kinds holds `capacity` frames of ones (never zero, so injections are visible)."""
    bank = ErrorBank(bins, capacity)
    t = (torch.arange(bins) + 0.5) * 1000 / bins
    for kind in ("x0", "noise"):
        bank.add(kind, t, torch.ones(bins, shape[0], capacity, *shape[1:]))
    return bank


def within(count, n, p, sigmas=5.0):
    """A binomial count is within `sigmas` standard deviations of n * p."""
    return abs(count - n * p) <= sigmas * (n * p * (1 - p)) ** 0.5


# ---- the bank -------------------------------------------------------------------

def test_timesteps_map_to_their_bins():
    t = torch.tensor([0.0, 19.99, 20.0, 500.0, 979.9, 980.0, 999.99, 1000.0])
    assert timestep_bins(t, 50).tolist() == [0, 0, 1, 25, 48, 49, 49, 49]
    assert timestep_bins(t, 4).tolist() == [0, 0, 0, 2, 3, 3, 3, 3]


def test_ring_buffer_keeps_the_last_capacity_frames_of_each_bin():
    bank = ErrorBank(bins=50, capacity=500)
    values = torch.arange(700.0).view(1, 1, 700, 1, 1)  # one sample, 700 frames, frame i holds i
    bank.add("x0", torch.tensor([10.0]), values[:, :, :300])
    bank.add("x0", torch.tensor([15.0]), values[:, :, 300:])  # same bin 0
    assert bank.written["x0"][0] == 700 and bank.filled("x0")[0] == 500
    assert sorted(bank.storage["x0"][0].flatten().tolist()) == list(range(200, 700))
    assert bank.filled("x0")[1:].sum() == 0 and bank.filled("noise").sum() == 0


def test_draws_come_from_the_requested_bin_and_empty_bins_give_no_error():
    bank = ErrorBank(bins=50, capacity=8)
    bank.add("x0", torch.tensor([205.0]), torch.full((1, 1, 8, 2, 2), 10.0))  # bin 10
    bank.add("x0", torch.tensor([405.0]), torch.full((1, 1, 8, 2, 2), 20.0))  # bin 20
    g = torch.Generator().manual_seed(0)
    out = bank.sample("x0", torch.tensor([10, 20, 3, 15, 49]), 5, g)
    assert out.shape == (5, 1, 5, 2, 2)
    assert out[:, 0, :, 0, 0].tolist() == [[10.0] * 5, [20.0] * 5, [0.0] * 5, [0.0] * 5, [0.0] * 5]
    assert bank.filled_bins("x0").tolist() == [10, 20]
    assert torch.equal(bank.sample("noise", torch.tensor([3]), 2, g, shape=(1, 2, 2)), torch.zeros(1, 1, 2, 2, 2))
    # motion errors are not tied to a timestep: they come from whichever bins are filled
    everything = Injection(*(torch.ones(400, dtype=torch.bool) for _ in range(4)))
    errors = draw_errors(bank, everything, torch.full((400,), 990.0), 2, 1, (1, 2, 2), g)
    assert set(errors["motion"][:, 0, 0, 0, 0].tolist()) == {10.0, 20.0}
    assert errors["target"].abs().sum() == 0 and errors["noise"].abs().sum() == 0  # bin 49 is empty


def test_sampling_is_deterministic_given_a_generator_and_uses_the_whole_ring():
    bank = ErrorBank(bins=2, capacity=16)
    bank.add("noise", torch.tensor([100.0]), torch.arange(16.0).view(1, 1, 16, 1, 1))
    draw = lambda seed: bank.sample("noise", torch.zeros(64, dtype=torch.long), 4, torch.Generator().manual_seed(seed))
    assert torch.equal(draw(3), draw(3)) and not torch.equal(draw(3), draw(4))
    assert set(draw(3).flatten().tolist()) == set(range(16))


def test_bank_state_round_trips_through_a_file(tmp_path):
    bank = ErrorBank(bins=5, capacity=3)
    g = torch.Generator().manual_seed(1)
    for _ in range(4):
        bank.add("x0", torch.rand(2, generator=g) * 1000, torch.randn(2, 2, 3, 2, 2, generator=g))
        bank.add("noise", torch.rand(2, generator=g) * 1000, torch.randn(2, 2, 3, 2, 2, generator=g))
    torch.save(bank.state_dict(), tmp_path / "bank.pt")
    restored = ErrorBank(bins=5, capacity=3)
    restored.load_state_dict(torch.load(tmp_path / "bank.pt", weights_only=True))
    bins = torch.arange(5)
    for kind in ("x0", "noise"):
        assert torch.equal(restored.written[kind], bank.written[kind])
        a = bank.sample(kind, bins, 6, torch.Generator().manual_seed(9))
        assert torch.equal(a, restored.sample(kind, bins, 6, torch.Generator().manual_seed(9)))
    # further writes land in the same ring slots
    bank.add("x0", torch.tensor([1.0]), torch.full((1, 2, 1, 2, 2), 7.0))
    restored.add("x0", torch.tensor([1.0]), torch.full((1, 2, 1, 2, 2), 7.0))
    assert torch.equal(bank.storage["x0"], restored.storage["x0"])


# ---- the injection policy -------------------------------------------------------

def test_injection_rates_match_the_published_probabilities():
    n = 20_000
    plan = draw_injection(torch.Generator().manual_seed(0), n)
    injected = int(plan.inject.sum())
    assert within(n - injected, n, 0.5)
    for part, p in (("motion", 0.9), ("target", 0.9), ("noise", 0.01)):
        chosen = getattr(plan, part)
        assert not (chosen & ~plan.inject).any(), f"{part} perturbed without an injection"
        assert within(int(chosen.sum()), injected, p), (part, int(chosen.sum()), injected)
    # the three parts are decided independently
    both = int((plan.motion & plan.target).sum())
    assert within(both, injected, 0.81)


def test_errors_land_exactly_where_the_injection_says():
    n = 2_000
    g = torch.Generator().manual_seed(5)
    bank = filled_bank()
    plan = draw_injection(g, n)
    timesteps = torch.rand(n, generator=g) * 1000
    errors = draw_errors(bank, plan, timesteps, motion_frames=6, target_frames=21, frame_shape=(2, 3, 3), generator=g)
    assert errors["motion"].shape == (n, 2, 6, 3, 3) and errors["target"].shape == (n, 2, 21, 3, 3)
    for part in ("motion", "target", "noise"):
        touched = errors[part].flatten(1).abs().amax(dim=1) > 0
        assert torch.equal(touched, getattr(plan, part)), part
    assert within(int(plan.noise.sum()), int(plan.inject.sum()), 0.01)


def test_sink_and_sparse_context_are_never_perturbed():
    g = torch.Generator().manual_seed(2)
    layout = plan_layout(102)
    clips = torch.randn(8, 2, 102, 3, 3, generator=g)
    everything = Injection(*(torch.ones(8, dtype=torch.bool) for _ in range(4)))
    timesteps = torch.full((8,), 500.0)
    errors = draw_errors(filled_bank(), everything, timesteps, 6, 21, (2, 3, 3), g)
    inputs = teacher_inputs(clips, layout, timesteps, torch.randn(8, 2, 21, 3, 3, generator=g), errors)
    sink_sparse = len(layout.sink) + len(layout.sparse)
    assert torch.equal(inputs.latents[:, :, :sink_sparse], clips[:, :, layout.sink + layout.sparse])
    motion = slice(sink_sparse, sink_sparse + 6)
    assert torch.allclose(inputs.latents[:, :, motion], clips[:, :, layout.motion] + 1)


def test_the_target_velocity_leads_back_to_the_clean_target():
    g = torch.Generator().manual_seed(3)
    layout = plan_layout(30)
    clips = torch.randn(4, 2, 30, 3, 3, generator=g)
    timesteps = torch.tensor([50.0, 300.0, 700.0, 990.0])
    noise = torch.randn(4, 2, 21, 3, 3, generator=g)
    errors = {"motion": torch.zeros(4, 2, 6, 3, 3), "target": torch.randn(4, 2, 21, 3, 3, generator=g) * 0.1,
              "noise": torch.randn(4, 2, 21, 3, 3, generator=g) * 0.1}
    inputs = teacher_inputs(clips, layout, timesteps, noise, errors)
    sigma = (timesteps / 1000).view(-1, 1, 1, 1, 1)
    noisy = inputs.latents[:, :, 9:]
    assert torch.allclose(noisy - sigma * inputs.velocity, clips[:, :, 9:], atol=1e-5)
    clean = teacher_inputs(clips, layout, timesteps, noise, {k: torch.zeros_like(v) for k, v in errors.items()})
    assert torch.allclose(clean.velocity, noise - clips[:, :, 9:], atol=1e-6)


# ---- the context teacher's layout -------------------------------------------------

def test_full_layout_sink_sparse_motion_target():
    assert smallest_full_window() == 102
    layout = plan_layout(102)
    assert layout.sink == [0, 1, 2]
    assert layout.sparse == list(range(3, 70, 6))  # 12 frames, one per 6 latent frames (24 video frames)
    assert layout.motion == list(range(75, 81)) and layout.target == list(range(81, 102))
    # bounded layout: sink 0-2, sparse 3-14, motion 15-20 (the student's [0, 20]), target 21-41
    assert layout.positions == list(range(42))


def test_hand_worked_partial_layout():
    # 40 frames: target 19-39, motion 13-18, sink 0-2; between them only frame 7 is 6 frames before the motion
    layout = plan_layout(40)
    assert (layout.sink, layout.sparse, layout.motion) == ([0, 1, 2], [7], list(range(13, 19)))
    assert layout.target == list(range(19, 40))
    # the target starts at its absolute index (19 < 21); the context is packed right before it
    assert layout.positions == [0, 1, 2, 12, 13, 14, 15, 16, 17, 18] + list(range(19, 40))
    clips = torch.arange(40.0).view(1, 1, 40, 1, 1).expand(2, 1, 40, 1, 1)
    zeros = {"motion": torch.zeros(2, 1, 6, 1, 1), "target": torch.zeros(2, 1, 21, 1, 1), "noise": torch.zeros(2, 1, 21, 1, 1)}
    inputs = teacher_inputs(clips, layout, torch.tensor([1000.0, 400.0]), torch.zeros(2, 1, 21, 1, 1), zeros)
    assert inputs.latents[0, 0, :10, 0, 0].tolist() == [0, 1, 2, 7, 13, 14, 15, 16, 17, 18]
    assert inputs.timesteps.shape == (2, 31)
    assert inputs.timesteps[:, :10].abs().sum() == 0
    assert inputs.timesteps[0, 10:].eq(1000).all() and inputs.timesteps[1, 10:].eq(400).all()
    assert torch.allclose(inputs.latents[1, 0, 10:, 0, 0], 0.6 * torch.arange(19.0, 40.0))


def test_short_clips_degrade_gracefully():
    six = plan_layout(6)  # the trainer test's data.frames=6
    assert (six.sink, six.sparse, six.motion, six.target) == ([0, 1, 2], [], [], [3, 4, 5])
    assert six.positions == list(range(6))
    thirty = plan_layout(30)
    assert (thirty.sink, thirty.sparse, thirty.motion) == ([0, 1, 2], [], list(range(3, 9)))
    assert thirty.target == list(range(9, 30)) and thirty.positions == list(range(30))
    for end in range(2, 130):
        layout = plan_layout(end)
        assert layout.frames == sorted(set(layout.frames)) and layout.frames[-1] == end - 1
        assert len(layout.sparse) <= 12 and min(21, end - end // 2) <= len(layout.target) <= 21
        assert len(layout.positions) == len(layout.frames)
        context = layout.positions[:len(layout.context)]
        assert all(0 <= p <= 20 for p in context)
    assert context_positions(3, 18, 500, 21) == list(range(42))


# ---- the recipe -------------------------------------------------------------------

def test_cf_teacher_resumes_exactly_with_its_error_bank(tmp_path):
    def config(steps):
        return load_config("cf-teacher", overrides=TINY + [f"steps={steps}", "save_every=2", "data.frames=30",
                                                           "erft.capacity=4", "erft.rates.inject=1.0"])

    def losses(run):
        return [json.loads(line)["loss"] for line in open(tmp_path / run / "log.jsonl")]

    whole = Trainer(config(4), tmp_path / "whole", progress=False)
    whole.run()
    Trainer(config(2), tmp_path / "split", progress=False).run()
    second = Trainer(config(4), tmp_path / "split", resume=True, progress=False)
    second.run()
    assert losses("whole") == losses("split")
    assert whole.recipe.bank.filled("x0").sum() > 0
    for kind in ("x0", "noise"):
        assert torch.equal(whole.recipe.bank.storage[kind], second.recipe.bank.storage[kind])
    a, b = whole.weights("model"), second.weights("model")
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---- the distillation stages --------------------------------------------------------

from tether.memory import make_policy  # noqa: E402
from tether.train.recipes.context_forcing import (ContextualScore, MemoryRecorder, chunk_range,  # noqa: E402
                                                  memory_context, slice_context)


def stage_config(recipe, *extra):
    return load_config(recipe, overrides=TINY + ["steps=2"] + list(extra))


def test_stage2_context_from_the_students_memory_hand_worked():
    held = {"sink": [0, 1, 2], "slow": [6, 12, 18, 24], "fast": [27, 28, 29]}
    indices, num_sink = memory_context(held, target_start=30)
    # motion = the 6 frames before the target; slow frame 24 is among them and is not repeated
    assert indices == [0, 1, 2, 6, 12, 18, 24, 25, 26, 27, 28, 29] and num_sink == 3
    assert context_positions(3, 9, 30, 21) == [0, 1, 2] + list(range(12, 21)) + list(range(21, 42))
    assert slice_context(30) == (list(range(9, 30)), 0)
    assert slice_context(12) == (list(range(12)), 0)
    assert context_positions(0, 12, 12, 21) == list(range(33))  # short history: exact distances


def test_memory_recorder_sees_the_memory_before_the_target_and_changes_nothing():
    policy = make_policy("slow-fast", promotion="uniform")
    recorder = MemoryRecorder(policy, at=30)
    from tether.memory import CachedFrame

    for first in range(0, 36, 3):
        recorder.view(3, lambda k, p, h, w: k)
        frames = [CachedFrame(first + i, torch.zeros(1, 1, 1, 1), torch.randn(2, 1, 1, 1, 4), torch.zeros(2, 1, 1, 1, 4), (1, 1))
                  for i in range(3)]
        recorder.commit(frames)
        recorder.advance(3)
    # uniform promotion: first frames of even chunks, moved to slow memory as they leave the fast FIFO
    assert recorder.held == {"sink": [0, 1, 2], "slow": [6, 12, 18, 24], "fast": [27, 28, 29]}
    assert policy.next_index == 36 and [f.index for f in policy.fast] == [33, 34, 35]


def test_contextual_score_prepends_each_samples_clean_context_at_its_positions():
    from tether.checkpoints import load_transformer

    model = load_transformer("tiny").eval()
    g = torch.Generator().manual_seed(0)
    contexts = [torch.randn(1, 4, 3, 4, 4, generator=g), torch.randn(1, 4, 3, 4, 4, generator=g),
                torch.randn(1, 4, 2, 4, 4, generator=g)]
    positions = [[0, 1, 19, 21, 22], [0, 1, 19, 21, 22], [0, 20, 21, 22]]
    noisy, text = torch.randn(3, 4, 2, 4, 4, generator=g), torch.randn(3, 16, 32, generator=g)
    timesteps = torch.tensor([300.0, 700.0, 500.0])
    score = ContextualScore(model, contexts, positions)
    with torch.no_grad():
        out = score.forward_bidirectional(noisy, timesteps, text)
        for i in range(3):
            n = contexts[i].shape[2]
            frame_t = torch.cat([torch.zeros(1, n), timesteps[i].expand(1, 2)], dim=1)
            alone = model.forward_bidirectional(torch.cat([contexts[i], noisy[i:i + 1]], 2), frame_t, text[i:i + 1],
                                                frame_positions=torch.tensor(positions[i]))
            assert torch.allclose(out[i:i + 1], alone[:, :, n:], atol=1e-5)
        # guidance stacks [cond | uncond]: copy k of sample i sees sample i's context
        stacked = score.forward_bidirectional(torch.cat([noisy, noisy]), torch.cat([timesteps, timesteps]),
                                              torch.cat([text, text]))
    assert out.shape == noisy.shape and torch.allclose(stacked, torch.cat([out, out]), atol=1e-5)


def test_stage_lengths_and_the_curriculum(tmp_path):
    assert chunk_range([6, 21], 3) == (2, 7) and chunk_range([4, 21], 3) == (2, 7) and chunk_range([1, 2], 3) == (1, 1)
    one = Trainer(stage_config("cf-stage1"), tmp_path / "one", progress=False).recipe
    one.setup()
    lengths = {one.plan(s, 0, "critic").num_frames for s in range(40)}
    assert lengths == {6, 9, 12, 15, 18, 21}
    two = Trainer(stage_config("cf-stage2", "rollout.frames=[42,120]", "curriculum_steps=600"), tmp_path / "two",
                  progress=False).recipe
    two.setup()
    assert [two.longest_chunks(s) * 3 for s in (0, 300, 600, 900)] == [42, 81, 120, 120]
    near_300 = {two.plan(s, 0, "critic").num_frames for s in range(300, 340)}
    assert min(near_300) >= 42 and max(near_300) <= 84 and len(near_300) > 5
    assert two.target_frames(42) == 21 and two.target_frames(12) == 9 and two.target_frames(3) == 3


def test_the_generator_cosine_spans_its_own_updates(tmp_path):
    trainer = Trainer(stage_config("cf-stage1", "steps=600"), tmp_path / "r", progress=False)
    trainer.recipe.setup()
    assert trainer.cfg["optimizer"]["horizon"] == 120  # 600 steps, a generator update every 5th
    opt, schedule = trainer.optimizers["generator"], trainer.schedulers["generator"]
    for _ in range(120):
        opt.step()
        schedule.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.2 * trainer.cfg["optimizer"]["lr"])


@pytest.mark.parametrize("context", ["memory", "slice"])
def test_stage2_runs_with_either_context(tmp_path, context):
    trainer = Trainer(stage_config("cf-stage2", f"context={context}", "rollout.frames=[12,18]"), tmp_path / context,
                      progress=False)
    last = trainer.run()
    assert "generator_loss" in json.loads(open(tmp_path / context / "log.jsonl").readline())
    assert all(torch.isfinite(torch.tensor(v)) for v in last.values())


def test_lora_teacher_exports_as_plain_merged_weights():
    from tether.checkpoints import load_transformer
    from tether.model import WanTransformer
    from tether.train.lora import add_lora, merge_lora

    model = add_lora(load_transformer("tiny"), {"rank": 4, "alpha": 8})
    assert all(".lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)  # B starts at zero: make the adapters matter
    plain = WanTransformer(model.config)
    plain.load_state_dict(merge_lora(model.state_dict(), scale=8 / 4))
    latents, text = torch.randn(1, 4, 3, 4, 4, generator=g), torch.randn(1, 16, 32, generator=g)
    with torch.no_grad():
        a = model.forward_bidirectional(latents, torch.tensor([500.0]), text)
        b = plain.forward_bidirectional(latents, torch.tensor([500.0]), text)
        base = load_transformer("tiny").forward_bidirectional(latents, torch.tensor([500.0]), text)
    assert torch.allclose(a, b, atol=1e-5) and not torch.allclose(a, base, atol=1e-3)
