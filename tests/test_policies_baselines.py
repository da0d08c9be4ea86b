"""The baseline memory policies (frame-sink, infinity-rope, rolling) and their switch rules.

A tiny random model is enough: these tests check bookkeeping (which frames
are cached, at which positions, with which K/V), not image quality.
"""

import copy
import io
import zlib

import pytest
import torch

from tether.configs import CONFIGS
from tether.errors import TetherError
from tether.memory import CachedFrame, make_policy
from tether.memory.rolling import ROLLING_STEPS
from tether import sampler
from tether.schedule import warp_steps
from tether.stream import Stream
from tether.timeline import Segment, Timeline

BASELINES = ["frame-sink", "infinity-rope", "rolling"]
LATENT = (4, 4, 4)  # C, h, w: 2x2 = 4 tokens per latent frame with the (1, 2, 2) patch
TOKENS_PER_FRAME = 4


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model


def encode(prompt: str) -> torch.Tensor:
    """A fixed random text embedding per prompt."""
    generator = torch.Generator().manual_seed(zlib.crc32(prompt.encode()))
    return torch.randn(1, 6, CONFIGS["tiny"].text_dim, generator=generator)


def make_stream(model, policy, seed=0, **kwargs):
    if isinstance(policy, str):
        policy = make_policy(policy)
    return Stream(model, policy, encode, LATENT, seed=seed, **kwargs)


def fake_frames(first: int, count: int) -> list:
    return [CachedFrame(i, torch.zeros(1, 4, 2, 2), torch.zeros(2, 1, 4, 2, 32), torch.zeros(2, 1, 4, 2, 32), (2, 2))
            for i in range(first, first + count)]


def commit_chunks(policy, chunks: int) -> None:
    for _ in range(chunks):
        policy.commit(fake_frames(policy.next_index, policy.chunk_frames))
        policy.advance(policy.chunk_frames)


def indices(frames) -> list:
    return [f.index for f in frames]


def cached_kv(policy) -> dict:
    return {f.index: (f.k.clone(), f.v.clone()) for f in policy.cached_frames()}


class PositionRecorder:
    """Checks every temporal position a stream hands out: layouts and re-encodes."""

    def __init__(self, stream, cut_chunks=()):
        self.policy = stream.policy
        self.cut_chunks = set(cut_chunks)
        self.deliberate_chunks = []
        self.low, self.high = self.policy.positions
        stream.on_layout = self.on_layout
        plain_reencode = stream.reencode

        def reencode(frames, positions, text_ctx, past=None):
            self.check(positions)
            if past is not None:
                self.check(past.layout.key_positions)
            return plain_reencode(frames, positions, text_ctx, past=past)

        stream.reencode = reencode
        self.reencodes = 0

    def check(self, positions):
        for p in positions:
            assert self.low <= p <= self.high, f"position {p} outside {self.policy.positions}"

    def on_layout(self, stream, layout):
        self.check(layout.key_positions)
        deliberate = list(getattr(self.policy, "deliberate_positions", ()))
        if deliberate and layout.query_positions == deliberate:
            # the RoPE cut: allowed for the first chunk of a `#` segment, and only there
            assert stream.chunk_index in self.cut_chunks, f"RoPE cut at chunk {stream.chunk_index}"
            self.deliberate_chunks.append(stream.chunk_index)
        else:
            self.check(layout.query_positions)


class CommitOnlySampler:
    """Skips denoising (the memory does not depend on it) and only runs the commit pass: 1 forward per chunk."""

    def next_chunk(self, stream):
        view = stream.policy.view(stream.chunk_frames, stream.model.rotate_keys)
        stream.record_positions(view.layout)
        latents = stream.noise(stream.chunk_frames)
        sampler.commit(stream, latents, view, stream.text_for_chunk(stream.chunk_index))
        return latents


def alternating_timeline(total_chunks: int, segment_chunks: int) -> Timeline:
    segments = [Segment("a red fox runs" if i % 2 == 0 else "the fox sleeps", segment_chunks, cut=i % 4 == 3)
                for i in range(total_chunks // segment_chunks)]
    return Timeline(tuple(segments))


# ---- bounded memory and positions over a long rollout ---------------------

@pytest.mark.parametrize("name", BASELINES)
def test_long_rollout_stays_within_declared_frames_tokens_and_positions(model, name):
    policy = make_policy(name)
    stream = make_stream(model, policy, sampler=None if name == "rolling" else CommitOnlySampler())
    timeline = alternating_timeline(2000, 100)
    starts = timeline.starts()
    cut_chunks = [starts[i] for i, s in enumerate(timeline.segments) if s.cut]
    recorder = PositionRecorder(stream, cut_chunks)

    peak = 0
    for _ in stream.run(timeline):
        frames = policy.num_cached_frames()
        tokens = sum(f.k.shape[2] for f in policy.cached_frames())
        assert frames <= policy.max_frames
        assert tokens <= policy.max_frames * TOKENS_PER_FRAME
        peak = max(peak, frames)
    assert stream.chunk_index == 2000
    assert peak == policy.max_frames  # the bound is reached, so the check was not vacuous
    if name == "infinity-rope":
        assert recorder.deliberate_chunks == cut_chunks


def test_declared_bounds():
    assert make_policy("frame-sink").max_frames == 9  # 3 sink + 6 recent; 12 with the current chunk
    assert make_policy("infinity-rope").max_frames == 4  # 1 sink + 3 recent; window of 6 with the chunk
    assert make_policy("infinity-rope").positions == (0, 5)
    assert make_policy("infinity-rope").deliberate_positions == (45, 46, 47)
    assert make_policy("rolling").max_frames == 6  # 21 keys - 15 window frames


# ---- known cases, worked out by hand ---------------------------------------

def test_frame_sink_layout_by_hand():
    policy = make_policy("frame-sink")
    commit_chunks(policy, 2)
    layout = policy.layout(3)
    assert indices(layout.slots) == [0, 1, 2, 3, 4, 5]
    assert layout.key_positions == [0, 1, 2, 3, 4, 5]
    assert layout.query_positions == [6, 7, 8]

    commit_chunks(policy, 5)  # 21 frames generated
    layout = policy.layout(3)
    assert indices(layout.slots) == [0, 1, 2, 15, 16, 17, 18, 19, 20]
    assert layout.key_positions == [0, 1, 2, 15, 16, 17, 18, 19, 20]
    assert layout.query_positions == [21, 22, 23]

    policy.flush_for_switch(2)
    assert indices(policy.layout(3).slots) == [0, 1, 2, 19, 20]


def test_infinity_rope_reindexes_the_window_every_call():
    policy = make_policy("infinity-rope")
    assert policy.layout(3).query_positions == [3, 4, 5]
    commit_chunks(policy, 1)
    layout = policy.layout(3)
    assert indices(layout.slots) == [0, 1, 2]  # sink 0, then frames 1-2 of the first chunk
    assert layout.key_positions == [0, 1, 2]

    commit_chunks(policy, 9)  # 30 frames generated
    layout = policy.layout(3)
    assert indices(layout.slots) == [0, 27, 28, 29]
    assert layout.key_positions == [0, 0, 1, 2]
    assert layout.query_positions == [3, 4, 5]
    one_frame = policy.layout(1)
    assert one_frame.key_positions == [0, 2, 3, 4] and one_frame.query_positions == [5]


def test_infinity_rope_flush_and_rope_cut(model):
    stream = make_stream(model, "infinity-rope")
    layouts = []
    stream.on_layout = lambda s, layout: layouts.append((indices(layout.slots), layout.key_positions,
                                                          layout.query_positions))
    list(stream.run(Timeline((Segment("a", 4), Segment("b", 2, cut=True), Segment("c", 2)))))
    # chunk 4 starts the `#` segment: flushed to sink + last 2 frames in slots 1-2, queries at 45-47
    assert layouts[3] == ([0, 6, 7, 8], [0, 0, 1, 2], [3, 4, 5])
    assert layouts[4] == ([0, 10, 11], [0, 1, 2], [45, 46, 47])
    assert layouts[5] == ([0, 12, 13, 14], [0, 0, 1, 2], [3, 4, 5])
    # a switch without `#` flushes too, without the RoPE cut
    assert layouts[6] == ([0, 16, 17], [0, 1, 2], [3, 4, 5])


def test_rolling_noise_levels_and_commits(model):
    policy = make_policy("rolling")
    stream = make_stream(model, policy)
    levels = [round(t, 2) for t in warp_steps(ROLLING_STEPS, 5.0)]  # 1000, 952.38, 882.35, 769.23, 555.56
    forwards, committed = [], []
    plain_forward, plain_commit = model.forward_cached, policy.commit

    def forward(latents, timestep, *args, **kwargs):
        forwards.append([round(t, 2) for t in torch.as_tensor(timestep).reshape(-1)[::3].tolist()])
        return plain_forward(latents, timestep, *args, **kwargs)

    def commit(frames):
        committed.append(indices(frames))
        plain_commit(frames)

    model.forward_cached, policy.commit = forward, commit
    try:
        stream.set_prompt("a")
        stream.step()
        # warm-up: the window fills one chunk per forward, oldest at the lowest noise
        assert forwards == [levels[i::-1] for i in range(5)] + [[0.0]]
        assert [c.level for c in stream.sampler.window] == [4, 3, 2, 1]
        assert [c.index for c in stream.sampler.window] == [1, 2, 3, 4]
        forwards.clear()
        for _ in range(7):
            stream.step()
        # steady state: one window forward (levels newest = pure noise) + one commit per chunk
        assert forwards == [levels[::-1], [0.0]] * 7
    finally:
        del model.forward_cached
    assert committed == [list(range(3 * i, 3 * i + 3)) for i in range(8)]


def test_rolling_window_across_a_switch_gives_each_chunk_its_own_prompt(model):
    stream = make_stream(model, "rolling")
    stream.timeline = Timeline((Segment("a red fox runs", 2), Segment("the fox sleeps", 8)))
    stream.set_prompt("a red fox runs")
    rolling = stream.sampler
    for _ in range(4):
        rolling._admit(stream)  # chunks 0-3: two under each prompt
    latents = torch.cat([c.latents for c in rolling.window], dim=2)
    timesteps = torch.full((12,), 500.0)
    view = stream.policy.view(12, model.rotate_keys)
    mixed = rolling._forward(stream, latents, timesteps, view)
    for prompt, frames in [("a red fox runs", slice(0, 6)), ("the fox sleeps", slice(6, 12))]:
        alone = model.forward_cached(latents, timesteps[None], stream.text_context(prompt), view.layout.query_positions)
        assert torch.allclose(mixed[:, :, frames], alone[:, :, frames], atol=1e-5)


# ---- switch rules -----------------------------------------------------------

def test_recache_with_the_same_prompt_leaves_the_cache_unchanged(model):
    # Re-encoding is chunk-causal, so before anything is evicted (3 chunks fill
    # the 3-frame sink + 6-frame window) every chunk sees what it saw at commit.
    for options, chunks in [({}, 1), ({}, 3), ({"global_sink": True}, 2), ({"global_sink": True}, 3)]:
        stream = make_stream(model, make_policy("frame-sink", **options))
        stream.set_prompt("a red fox runs")
        for _ in range(chunks):
            stream.step()
        before = cached_kv(stream.policy)
        stream.switch_rule.apply(stream, stream.text_context("a red fox runs"))
        after = cached_kv(stream.policy)
        assert before.keys() == after.keys()
        for i in before:
            for old, new in zip(before[i], after[i]):
                assert (old - new).abs().max() <= 1e-5


def test_recache_rewrites_the_window_and_honours_global_sink(model):
    for global_sink in (False, True):
        stream = make_stream(model, make_policy("frame-sink", global_sink=global_sink))
        stream.set_prompt("a red fox runs")
        for _ in range(6):
            stream.step()
        before = cached_kv(stream.policy)
        stream.switch_rule.apply(stream, stream.text_context("the fox sleeps"))
        after = cached_kv(stream.policy)
        assert indices(stream.policy.cached_frames()) == [0, 1, 2, 12, 13, 14, 15, 16, 17]
        for i in before:
            k_old, k_new = before[i][0], after[i][0]
            # layer 0 sees only the frame itself; later layers see the new prompt
            assert torch.allclose(k_old[0], k_new[0], atol=1e-5)
            changed = not torch.allclose(k_old[1], k_new[1], atol=1e-4)
            assert changed == (i >= 3 or not global_sink), (i, global_sink)


def test_kv_flush_needs_a_policy_with_a_sink(model):
    with pytest.raises(TetherError, match="kv-flush"):
        make_stream(model, "window", switch="kv-flush")


@pytest.mark.parametrize("name, rule", [("frame-sink", "kv-flush"), ("infinity-rope", "kv-recache"),
                                        ("rolling", "kv-recache"), ("rolling", "kv-flush"),
                                        ("window", "kv-recache")])
def test_rules_compose_with_other_policies(model, name, rule):
    stream = make_stream(model, name, switch=rule)
    timeline = Timeline((Segment("a", 5), Segment("b", 3, cut=True)))
    PositionRecorder(stream, cut_chunks=[5])
    out = [latents for _, _, latents in stream.run(timeline)]
    assert len(out) == 8 and all(torch.isfinite(x).all() for x in out)


@pytest.mark.parametrize("name", BASELINES)
def test_two_segment_timeline_with_a_cut(model, name):
    stream = make_stream(model, name)
    timeline = Timeline((Segment("a red fox runs", 4), Segment("a city at night", 4, cut=True)))
    PositionRecorder(stream, cut_chunks=[4])
    out = [(chunk, segment, latents) for chunk, segment, latents in stream.run(timeline)]
    assert [(c, s) for c, s, _ in out] == [(i, 0) for i in range(4)] + [(i, 1) for i in range(4, 8)]
    assert all(x.shape == (1, 4, 3, 4, 4) and torch.isfinite(x).all() for _, _, x in out)
    assert stream.policy.num_cached_frames() <= stream.policy.max_frames


# ---- save and restore --------------------------------------------------------

def roundtrip(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("name, options", [("frame-sink", {}), ("frame-sink", {"global_sink": True}),
                                           ("infinity-rope", {}), ("rolling", {})])
@pytest.mark.parametrize("save_after", [2, 5])
def test_save_and_restore_mid_stream(model, name, options, save_after):
    # the switch (with a `#` cut) comes at chunk 4: after the save point or before it
    timeline = Timeline((Segment("a red fox runs", 4), Segment("the fox sleeps", 5, cut=True)))
    uninterrupted = [x for _, _, x in make_stream(model, make_policy(name, **options), seed=3).run(timeline)]

    first = make_stream(model, make_policy(name, **options), seed=3)
    run = first.run(timeline)
    for _ in range(save_after):
        next(run)
    state = roundtrip(copy.deepcopy(first.state_dict()))
    if name == "rolling":
        assert len(state["sampler"]["window"]) == 4  # restored mid-window

    resumed = make_stream(model, make_policy(name, **options), seed=99)
    resumed.load_state_dict(state)
    rest = [x for _, _, x in resumed.run(timeline)]
    assert len(rest) == len(uninterrupted) - save_after
    for a, b in zip(rest, uninterrupted[save_after:]):
        assert torch.equal(a, b)


def test_a_bundle_samples_at_the_shift_it_was_trained_with(tmp_path):
    """pipeline.json "shift" places every sampler's steps; adapter bundles inherit their base's."""
    import json
    import os

    from tether.pipeline import BUILTIN, load_pipeline
    from tether.schedule import warp_steps

    bundle = tmp_path / "bundle"
    bundle.mkdir()
    for part in ("transformer.safetensors", "text_encoder", "vae"):
        os.symlink(BUILTIN / part, bundle / part)
    meta = json.loads((BUILTIN / "pipeline.json").read_text())
    (bundle / "pipeline.json").write_text(json.dumps(meta | {"shift": 5.0}))
    pipe = load_pipeline(str(bundle))
    assert pipe.shift == 5.0
    assert pipe.make_stream("window").sampler.timesteps == warp_steps([1000, 750, 500, 250], 5.0)
    assert pipe.make_stream("rolling").sampler.timesteps == warp_steps([1000, 800, 600, 400, 200], 5.0)
    assert meta["shift"] == 1.0  # the built-in model trained at shift 1: its steps are the unwarped ones
    assert load_pipeline().make_stream("window").sampler.timesteps == [1000.0, 750.0, 500.0, 250.0]
    adapter = tmp_path / "adapter-bundle"
    adapter.mkdir()
    os.symlink(BUILTIN.parent / "context-forcing" / "adapter", adapter / "adapter")
    (adapter / "pipeline.json").write_text(json.dumps({"base": os.path.relpath(bundle, adapter), "lora": "adapter",
                                                        "height": 64, "width": 64}))
    assert load_pipeline(str(adapter)).shift == 5.0
