"""Slow-fast memory [CF], dual memory [GF] and the APR switch rule, on a tiny random model."""

import io
import math

import pytest
import torch

from tether.configs import CONFIGS
from tether.errors import TetherError
from tether.memory import CachedFrame, make_policy
from tether.memory.apr import APR
from tether.memory.base import AttentionView, Layout
from tether.memory.switch import make_switch_rule
from tether.sampler import FewStepSampler, commit
from tether.stream import Stream
from tether.timeline import Segment, Timeline

CFG = CONFIGS["tiny"]
LATENT = (CFG.in_channels, 4, 4)
TOKENS = 4  # (4 / 2) * (4 / 2)
LAYERS, HEADS, HEAD_DIM = CFG.num_layers, CFG.num_heads, CFG.head_dim


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model


@pytest.fixture(scope="module")
def texts():
    g = torch.Generator().manual_seed(1)
    return {p: torch.randn(1, 10, CFG.text_dim, generator=g) for p in ("a", "b", "c")}


def stream_for(model, texts, policy, steps=(1000,), **kwargs):
    return Stream(model, policy, lambda p: texts[p], LATENT, sampler=FewStepSampler(steps), seed=0, **kwargs)


def identity_rotate(keys, positions, h, w):
    return keys


# ---- synthetic frames for the bookkeeping rules ----------------------------
def synthetic_frame(index, key=None, latent=None):
    """A CachedFrame whose every token has the key `key` [layers, heads*head_dim]."""
    key = torch.zeros(LAYERS, HEADS * HEAD_DIM) if key is None else key
    k = key.reshape(LAYERS, 1, 1, HEADS, HEAD_DIM).expand(LAYERS, 1, TOKENS, HEADS, HEAD_DIM).clone()
    latent = torch.zeros(1, CFG.in_channels * 16) if latent is None else latent
    return CachedFrame(index, latent.reshape(1, CFG.in_channels, 4, 4), k, torch.zeros_like(k), (2, 2))


def commit_chunk(policy, keys=None, latents=None):
    frames = [synthetic_frame(policy.next_index + i, None if keys is None else keys[i],
                              None if latents is None else latents[i]) for i in range(3)]
    policy.commit(frames)
    policy.advance(3)


def unit(i, dim=HEADS * HEAD_DIM):
    v = torch.zeros(dim)
    v[i] = 1.0
    return v


STILL = torch.stack([unit(0), unit(0)])  # [layers, dim]: the same key in both layers
MOVED = torch.stack([unit(1), unit(1)])  # orthogonal to STILL in both layers
MOVED_IN_LAYER_1 = torch.stack([unit(0), unit(1)])


def rollout_keys(policy, chunk_keys):
    """Commit one chunk per entry: a [layers, dim] key for all 3 frames, or a list of 3."""
    for keys in chunk_keys:
        commit_chunk(policy, keys if isinstance(keys, list) else [keys] * 3)


# ---- bounded memory and positions over a long rollout ----------------------
class CommitOnly:
    """A sampler that takes fresh noise as the finished chunk: the memory sees real commits at half the cost."""

    def next_chunk(self, stream):
        view = stream.policy.view(stream.chunk_frames, stream.model.rotate_keys)
        stream.record_positions(view.layout)
        x0 = stream.noise(stream.chunk_frames)
        commit(stream, x0, view, stream.text_for_chunk(stream.chunk_index))
        return x0


LONG_TIMELINE = Timeline(tuple(
    Segment("abc"[i % 3], 100, cut=(i % 4 == 3)) for i in range(20)
))  # 2,000 chunks, a prompt switch every 100 and a scene cut every 400


@pytest.mark.parametrize("name,options", [
    ("slow-fast", {"promotion": "paper"}),
    ("slow-fast", {"promotion": "code"}),
    ("slow-fast", {"promotion": "uniform"}),
    ("dual", {"anchor_feature": "latent"}),
    ("dual", {"anchor_feature": "pooled_keys"}),
])
def test_long_rollout_stays_within_declared_frames_tokens_and_positions(model, texts, name, options):
    policy = make_policy(name, **options)
    positions = []
    stream = Stream(model, policy, lambda p: texts[p], LATENT, sampler=CommitOnly(),
                    on_layout=lambda s, layout: positions.extend(layout.key_positions + layout.query_positions))
    reencode = stream.reencode
    reencoded = []

    def recording_reencode(frames, frame_positions, text_ctx, past=None):
        reencoded.append(len(frames))
        positions.extend(frame_positions)
        if past is not None:
            positions.extend(past.layout.key_positions)
        return reencode(frames, frame_positions, text_ctx, past)

    stream.reencode = recording_reencode
    assert LONG_TIMELINE.num_chunks == 2000
    most_frames = most_tokens = 0
    for _ in stream.run(LONG_TIMELINE):
        cached = policy.cached_frames()
        most_frames = max(most_frames, len(cached))
        most_tokens = max(most_tokens, sum(f.k.shape[2] for f in cached))
        assert min(positions) >= 0 and max(positions) <= 20
        positions.clear()
    assert policy.positions == (0, 20)
    assert most_frames <= policy.max_frames
    assert most_tokens <= policy.max_frames * TOKENS
    if name == "slow-fast":
        assert policy.max_frames == 18
    else:
        assert policy.max_frames == 9
        assert reencoded, "APR never re-encoded anything"


# ---- slow-fast: layout ------------------------------------------------------
def layouts_of_uniform_rollout(model, texts, chunks, **options):
    policy = make_policy("slow-fast", promotion="uniform", **options)
    layouts = []
    stream = stream_for(model, texts, policy, on_layout=lambda s, layout: layouts.append(layout))
    stream.set_prompt("a")
    for _ in range(chunks):
        stream.step()
    return layouts


def described(layout):
    return [f.index for f in layout.slots], layout.key_positions, layout.query_positions


def test_slow_fast_layout_after_n_chunks(model, texts):
    layouts = layouts_of_uniform_rollout(model, texts, 31)  # layouts[n]: the layout after n chunks
    assert described(layouts[0]) == ([], [], [0, 1, 2])
    assert described(layouts[1]) == ([0, 1, 2], [0, 1, 2], [3, 4, 5])
    assert described(layouts[2]) == ([0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 5], [6, 7, 8])
    # chunks 2, 4, 6 are promoted; frame 18 (chunk 6) still waits in the fast FIFO
    assert described(layouts[7]) == ([0, 1, 2, 6, 12, 18, 19, 20], [0, 1, 2, 13, 14, 15, 16, 17], [18, 19, 20])
    # frames 6 ... 84 were promoted; the slow FIFO keeps the last 12
    assert described(layouts[30]) == (
        [0, 1, 2] + list(range(18, 85, 6)) + [87, 88, 89], list(range(18)), [18, 19, 20])


def test_slow_fast_pinned_queries_sit_at_18_to_20_from_the_start(model, texts):
    layouts = layouts_of_uniform_rollout(model, texts, 8, pin_queries=True)
    assert described(layouts[0]) == ([], [], [18, 19, 20])
    assert described(layouts[1]) == ([0, 1, 2], [0, 1, 2], [18, 19, 20])
    assert described(layouts[2]) == ([0, 1, 2, 3, 4, 5], [0, 1, 2, 15, 16, 17], [18, 19, 20])
    assert described(layouts[7]) == ([0, 1, 2, 6, 12, 18, 19, 20], [0, 1, 2, 13, 14, 15, 16, 17], [18, 19, 20])


# ---- slow-fast: promotion by surprisal ---------------------------------------
def test_paper_promotes_a_sharp_change_and_not_a_static_scene():
    static = make_policy("slow-fast", promotion="paper")
    rollout_keys(static, [STILL] * 12)
    assert static.promotions == {} and static.slow == []

    changed = make_policy("slow-fast", promotion="paper")
    rollout_keys(changed, [STILL] * 4 + [MOVED] * 8)  # the change is at chunk 4, frame 12
    assert changed.promotions == {12: (True, True)}
    assert [f.index for f in changed.slow] == [12]


def test_paper_tests_only_every_second_chunk():
    policy = make_policy("slow-fast", promotion="paper")
    rollout_keys(policy, [STILL] * 3 + [MOVED] * 8)  # the change is at chunk 3: never tested
    assert policy.promotions == {}


def test_paper_threshold_is_on_the_preceding_frame():
    def key_at(degrees):
        a = math.radians(degrees)
        return torch.stack([unit(0) * math.cos(a) + unit(1) * math.sin(a)] * LAYERS)

    for degrees, promoted in ((15, False), (20, True)):  # cos 15 deg = 0.966, cos 20 deg = 0.940
        policy = make_policy("slow-fast", promotion="paper")
        rollout_keys(policy, [key_at(0)] * 2 + [key_at(degrees)] * 2)
        assert (6 in policy.promotions) == promoted


def test_code_variant_compares_chunk_means_every_chunk():
    policy = make_policy("slow-fast", promotion="code")
    rollout_keys(policy, [STILL] * 3 + [MOVED] * 5)  # chunk 3: an odd chunk, still tested
    assert policy.promotions == {9: (True, True)}

    # a change inside the chunk moves the chunk mean (cos 2/sqrt(5) = 0.89) but not the first frame
    inside = [STILL] * 4 + [[STILL, STILL, MOVED]]
    code, paper = make_policy("slow-fast", promotion="code"), make_policy("slow-fast", promotion="paper")
    rollout_keys(code, inside)
    rollout_keys(paper, inside)
    assert code.promotions == {12: (True, True)}
    assert paper.promotions == {}


def test_code_variant_promotes_nothing_before_frame_6():
    policy = make_policy("slow-fast", promotion="code")
    rollout_keys(policy, [STILL] + [MOVED] * 6)  # the change is at chunk 1, frame 3
    assert policy.promotions == {}


def test_code_variant_decides_per_layer():
    policy = make_policy("slow-fast", promotion="code")
    rollout_keys(policy, [STILL] * 3 + [MOVED_IN_LAYER_1] * 2)
    assert policy.promotions == {9: (False, True)}
    assert [f.index for f in policy.slow] == [9]
    view = policy.view(3, identity_rotate)
    keys_layer_0, _ = view(0)
    keys_layer_1, _ = view(1)
    assert keys_layer_0.shape[1] == 3 * TOKENS + 3 * TOKENS  # sink + fast: frame 9 is hidden
    assert keys_layer_1.shape[1] == 7 * TOKENS


def test_uniform_promotes_every_kth_chunk_whatever_the_content():
    policy = make_policy("slow-fast", promotion="uniform", every=3)
    rollout_keys(policy, [STILL] * 10)
    assert sorted(policy.promotions) == [9, 18, 27]


def test_slow_fast_rejects_bad_options():
    with pytest.raises(TetherError):
        make_policy("slow-fast", promotion="surprise")
    with pytest.raises(TetherError):
        make_policy("slow-fast", slow_frames=16)  # 3 + 16 + 6 > 21 positions


# ---- dual: anchors -----------------------------------------------------------
def latent(*values):
    v = torch.zeros(CFG.in_channels * 16)
    v[: len(values)] = torch.tensor(values)
    return v


def dual_with_anchors(*anchor_latents, **options):
    policy = make_policy("dual", **options)
    commit_chunk(policy, latents=list(anchor_latents))
    assert [a.index for a in policy.anchors] == [0, 1, 2]
    return policy


def test_anchor_update_replaces_the_most_redundant_anchor():
    # cos(a0, a1) = 0, cos(a0, a2) = 0.6, cos(a1, a2) = 0.8: R = (0.6, 0.8, 0.8);
    # a1 and a2 tie, a2 is closer to the others (0.6 + 0.8 > 0 + 0.8), so a2 is the target
    policy = dual_with_anchors(latent(1, 0), latent(0, 1), latent(0.6, 0.8))
    # the chunk's most novel frame is e2 (Z = 1 > 0.8)
    commit_chunk(policy, latents=[latent(1, 0), latent(0, 0, 1), latent(0, 1)])
    assert [a.index for a in policy.anchors] == [0, 1, 4]


def test_anchor_update_keeps_anchors_when_nothing_is_novel_enough():
    policy = dual_with_anchors(latent(1, 0), latent(0, 1), latent(0.6, 0.8))
    # cos with a2 = 0.96: Z = 0.04 < R = 0.8
    commit_chunk(policy, latents=[latent(0.8, 0.6)] * 3)
    assert [a.index for a in policy.anchors] == [0, 1, 2]


def test_anchor_update_threshold_and_last_tie_break():
    # R = (0.3, 0, 0.3) and the sums tie too: the earlier slot (a0) is the target
    anchors = (latent(1, 0, 0, 0), latent(0, 1, 0, 0), latent(0.3, 0, math.sqrt(1 - 0.09), 0))
    for similarity, replaced in ((0.68, True), (0.72, False)):  # Z = 0.32 > 0.3, Z = 0.28 < 0.3
        policy = dual_with_anchors(*anchors)
        commit_chunk(policy, latents=[latent(0, similarity, 0, math.sqrt(1 - similarity**2))] * 3)
        assert [a.index for a in policy.anchors] == ([3, 1, 2] if replaced else [0, 1, 2])


def test_anchor_update_on_pooled_keys():
    policy = make_policy("dual", anchor_feature="pooled_keys")
    commit_chunk(policy, keys=[STILL, MOVED, MOVED_IN_LAYER_1])
    # features are keys averaged over layers: e0, e1, (e0 + e1) / 2 -> the third is the most redundant
    commit_chunk(policy, keys=[torch.stack([unit(2)] * LAYERS)] * 3)
    assert [a.index for a in policy.anchors] == [0, 1, 3]


def test_dual_layout(model, texts):
    policy = make_policy("dual")
    layouts = []
    stream = stream_for(model, texts, policy, on_layout=lambda s, layout: layouts.append(layout))
    stream.set_prompt("a")
    for _ in range(11):
        stream.step()
    # while the anchors (the first frames) are still in the LTM, they are attended there only
    assert described(layouts[2]) == ([0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 5], [6, 7, 8])
    slots, positions, queries = described(layouts[10])
    assert slots[-6:] == list(range(24, 30)) and positions[-6:] == list(range(12, 18))
    assert positions[:-6] == [0] * (len(slots) - 6) and len(slots) - 6 <= 3
    assert queries == [18, 19, 20]


def test_scene_cut_flushes_the_ltm_and_keeps_the_anchors(model, texts):
    policy = make_policy("dual")
    layouts = []
    stream = stream_for(model, texts, policy, on_layout=lambda s, layout: layouts.append(layout))
    for _ in stream.run(Timeline((Segment("a", 6), Segment("b", 2, cut=True)))):
        if len(layouts) == 6:
            anchors_before_cut = list(policy.anchors)
    cut_layout = layouts[6]
    assert [f.index for f in cut_layout.slots] == [a.index for a in anchors_before_cut]
    assert cut_layout.key_positions == [0, 0, 0] and cut_layout.query_positions == [18, 19, 20]

    policy.on_scene_cut()
    assert policy.local == [] and len(policy.anchors) == 3


# ---- APR ----------------------------------------------------------------------
def test_apr_weights():
    rule = make_switch_rule("apr")
    assert rule.alpha_max == 0.8
    assert rule.weight(0, 6) == pytest.approx(0.8)
    assert rule.weight(1, 6) == pytest.approx(0.8)  # 5/6 capped at 0.8
    assert rule.weight(3, 6) == pytest.approx(0.5)
    assert rule.weight(5, 6) == pytest.approx(1 / 6)
    assert rule.weight(8, 6) == 0.0
    assert APR(alpha_max=1.0, window=math.inf).weight(100, math.inf) == 1.0
    with pytest.raises(TetherError):
        APR(alpha_max=1.5)
    with pytest.raises(TetherError):
        APR(window=0)


def dual_stream(model, texts, chunks=5):
    stream = stream_for(model, texts, make_policy("dual"))
    stream.set_prompt("a")
    for _ in range(chunks):
        stream.step()
    return stream


def test_apr_blends_each_ltm_frame_by_its_distance(model, texts):
    stream = dual_stream(model, texts)
    policy = stream.policy
    text_b = stream.text_context("b")
    state = policy.state_dict()
    old = list(policy.local)
    assert [f.index for f in old] == list(range(9, 15))
    make_switch_rule("kv-recache").apply(stream, text_b)
    new = list(policy.local)
    policy.load_state_dict(state)
    anchors = [(a.index, a.k) for a in policy.anchors]
    make_switch_rule("apr").apply(stream, text_b)
    for before, after, blended, alpha in zip(old, new, policy.local, (1 / 6, 1 / 3, 1 / 2, 2 / 3, 0.8, 0.8)):
        torch.testing.assert_close(blended.k, (1 - alpha) * before.k + alpha * after.k)
        torch.testing.assert_close(blended.v, (1 - alpha) * before.v + alpha * after.v)
    assert [(a.index, a.k) for a in policy.anchors] == anchors  # anchors are not recached


def test_apr_with_alpha_one_is_plain_recache(model, texts):
    stream = dual_stream(model, texts)
    policy = stream.policy
    text_b = stream.text_context("b")
    state = policy.state_dict()

    # plain recache by hand: the LTM as one block at its layout positions, anchors as context
    layout = policy.layout(3)
    local = {id(f) for f in policy.local}
    context = [(s, p) for s, p in zip(layout.slots, layout.key_positions) if id(s) not in local]
    ltm_positions = layout.key_positions[len(context):]
    past = AttentionView(Layout([s for s, _ in context], [p for _, p in context], ltm_positions), stream.model.rotate_keys)
    expected = stream.reencode(policy.local, ltm_positions, text_b, past=past)

    APR(alpha_max=1.0, window=math.inf).apply(stream, text_b)
    for got, want in zip(policy.local, expected):
        torch.testing.assert_close(got.k, want.k, atol=1e-5, rtol=0)
        torch.testing.assert_close(got.v, want.v, atol=1e-5, rtol=0)

    policy.load_state_dict(state)
    make_switch_rule("kv-recache").apply(stream, text_b)
    for got, want in zip(policy.local, expected):
        torch.testing.assert_close(got.k, want.k, atol=1e-5, rtol=0)
        torch.testing.assert_close(got.v, want.v, atol=1e-5, rtol=0)


# ---- resuming ------------------------------------------------------------------
@pytest.mark.parametrize("name,options", [
    ("slow-fast", {"promotion": "paper"}),
    ("slow-fast", {"promotion": "code"}),
    ("dual", {}),
])
def test_save_and_restore_mid_stream_matches_an_uninterrupted_run(model, texts, name, options):
    timeline = Timeline((Segment("a", 7), Segment("b", 4), Segment("c", 3, cut=True)))
    steps = (1000, 750, 500, 250)

    whole = stream_for(model, texts, make_policy(name, **options), steps=steps)
    expected = [latents for _, _, latents in whole.run(timeline)]

    first = stream_for(model, texts, make_policy(name, **options), steps=steps)
    for chunk, _, _ in first.run(timeline):
        if chunk == 5:
            break
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)

    resumed = stream_for(model, texts, make_policy(name, **options), steps=steps)
    resumed.load_state_dict(torch.load(buffer, weights_only=False))
    rest = [latents for _, _, latents in resumed.run(timeline)]
    assert len(rest) == len(expected) - 6
    for got, want in zip(rest, expected[6:]):
        assert torch.equal(got, want)
