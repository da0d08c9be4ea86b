"""The transformer against diffusers, and cached inference against full recomputation."""

import pytest
import torch
from diffusers import WanTransformer3DModel
from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

from tether.configs import CONFIGS
from tether.memory import make_policy
from tether.model import WanTransformer
from tether.stream import Stream
from tether.timeline import Segment, Timeline

CFG = CONFIGS["tiny"]


def ours_and_diffusers(cfg, seed: int):
    """Our transformer at `cfg` and diffusers' WanTransformer3DModel holding the same weights."""
    torch.manual_seed(seed)
    ours = WanTransformer(cfg).eval()
    converted = convert_wan_transformer_to_diffusers({k: v.clone() for k, v in ours.state_dict().items()})
    reference = WanTransformer3DModel(
        patch_size=cfg.patch_size, num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim,
        in_channels=cfg.in_channels, out_channels=cfg.out_channels, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim,
        ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers, cross_attn_norm=True, eps=cfg.eps,
    ).eval()
    reference.load_state_dict(converted, strict=True)
    return ours, reference


@pytest.fixture(scope="module")
def models():
    return ours_and_diffusers(CFG, seed=0)


def padded_text(batch, length=CFG.text_len, used=7):
    text = torch.randn(batch, length, CFG.text_dim)
    text[:, used:] = 0  # Wan zero-pads past the prompt; diffusers expects the padding done by the caller
    return text


@torch.no_grad()
def test_bidirectional_matches_diffusers(models):
    ours, reference = models
    x = torch.randn(2, CFG.in_channels, 5, 8, 12)
    t = torch.tensor([500.0, 937.5])
    text = padded_text(2)
    ours_out = ours.forward_bidirectional(x, t, text)
    ref_out = reference(x, t, text, return_dict=False)[0]
    assert ours_out.shape == x.shape
    assert (ours_out - ref_out).abs().max() <= 1e-5


@torch.no_grad()
def test_per_frame_timesteps_match_diffusers_per_token(models):
    ours, reference = models
    x = torch.randn(1, CFG.in_channels, 4, 4, 6)
    t = torch.tensor([[0.0, 250.0, 625.0, 1000.0]])
    text = padded_text(1)
    tokens_per_frame = (4 // 2) * (6 // 2)
    ref_out = reference(x, t.repeat_interleave(tokens_per_frame, dim=1), text, return_dict=False)[0]
    assert (ours.forward_bidirectional(x, t, text) - ref_out).abs().max() <= 1e-5


@torch.no_grad()
def test_short_text_is_zero_padded_like_wan(models):
    ours, _ = models
    x = torch.randn(1, CFG.in_channels, 2, 4, 4)
    text = padded_text(1)
    assert (ours.forward_bidirectional(x, 500.0, text[:, :7]) - ours.forward_bidirectional(x, 500.0, text)).abs().max() == 0


@torch.no_grad()
def test_rope_has_no_length_limit_and_is_relative(models):
    ours, _ = models
    x = torch.randn(1, CFG.in_channels, 3, 4, 4)
    text = padded_text(1)
    near = ours.forward_bidirectional(x, 500.0, text, frame_positions=torch.arange(3))
    # 30 minutes of video is ~2,400 latent frames; the forks' table stops at 1024.
    far = ours.forward_bidirectional(x, 500.0, text, frame_positions=torch.arange(3) + 5000)
    assert torch.isfinite(far).all()
    assert (near - far).abs().max() < 1e-4  # RoPE scores depend only on position differences


@torch.no_grad()
def test_block_causal_equals_masked_attention(models):
    ours, _ = models
    x = torch.randn(1, CFG.in_channels, 7, 4, 4)
    t = torch.rand(1, 7) * 1000
    text = padded_text(1)
    chunk_of = torch.arange(7) // 3
    mask = chunk_of[:, None] >= chunk_of[None, :]
    a = ours.forward_block_causal(x, t, text, chunk_size=3)
    b = ours.forward_masked(x, t, text, mask)
    assert (a - b).abs().max() <= 1e-5
    # and the first chunk does not see the future
    x2 = x.clone()
    x2[:, :, 3:] = torch.randn_like(x2[:, :, 3:])
    assert (ours.forward_block_causal(x2, t, text)[:, :, :3] - a[:, :, :3]).abs().max() == 0


def test_cached_generation_equals_block_causal_recomputation(models):
    """Every forward of a full-context stream equals one block-causal pass over its clean context."""
    ours, _ = models
    text = padded_text(1)
    calls = []
    original = ours.forward_cached

    def recording(latents, timestep, text_ctx, query_positions, past=None, capture=False):
        result = original(latents, timestep, text_ctx, query_positions, past=past, capture=capture)
        out = result[0] if capture else result
        calls.append((latents.clone(), float(timestep), list(query_positions), out.clone()))
        return result

    ours.forward_cached = recording
    try:
        stream = Stream(ours, make_policy("full"), lambda prompt: text, (CFG.in_channels, 4, 4), seed=3)
        chunks = [latents for _, _, latents in stream.run(Timeline((Segment("p", 5),)))]
    finally:
        del ours.forward_cached
    clean = torch.cat(chunks, dim=2)
    frames = clean.shape[2]
    with torch.no_grad():
        all_clean = ours.forward_block_causal(clean, torch.zeros(1, frames), text)
        worst = 0.0
        for latents, t, positions, out in calls:
            start = positions[0]
            if t == 0.0:  # commit pass: the clean chunk against clean history
                expected = all_clean[:, :, start:start + 3]
            else:  # denoising step: noisy chunk against clean history
                sequence = torch.cat([clean[:, :, :start], latents], dim=2)
                timesteps = torch.cat([torch.zeros(start), torch.full((3,), t)])[None]
                expected = ours.forward_block_causal(sequence, timesteps, text)[:, :, start:]
            worst = max(worst, (out - expected).abs().max().item())
    assert len(calls) == 5 * 5
    assert worst <= 1e-5


def test_generation_is_seeded_and_deterministic(models):
    ours, _ = models
    text = padded_text(1)

    def run(seed):
        stream = Stream(ours, make_policy("window", window=6), lambda p: text, (CFG.in_channels, 4, 4), seed=seed)
        return torch.cat([lat for _, _, lat in stream.run(Timeline((Segment("p", 4),)))], dim=2)

    a, b, c = run(1), run(1), run(2)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_window_stream_runs_past_any_table_limit(models):
    ours, _ = models
    text = padded_text(1)
    policy = make_policy("window", window=6)
    stream = Stream(ours, policy, lambda p: text, (CFG.in_channels, 4, 4), seed=0)
    stream.set_prompt("p")
    policy.next_index = 2400  # half an hour of latent frames
    for _ in range(3):
        assert torch.isfinite(stream.step()).all()
    assert policy.num_cached_frames() == 6
    assert policy.layout(3).query_positions == [2409, 2410, 2411]


def test_text_cache_is_bounded(models):
    ours, _ = models
    stream = Stream(ours, make_policy("window"), lambda p: padded_text(1), (CFG.in_channels, 4, 4))
    first = stream.text_context("p0")
    for i in range(1, 20):
        stream.text_context(f"p{i}")
    assert len(stream._text_cache) == Stream.TEXT_CACHE_SIZE
    assert stream.text_context("p19") is stream._text_cache["p19"]
    assert stream.text_context("p0") is not first  # evicted, then encoded again


@torch.no_grad()
def test_four_by_four_patches_match_diffusers():
    """The "toy-s4" layout (patch (1, 4, 4), over a stride-4 VAE's latents) against diffusers too."""
    from dataclasses import replace

    cfg = replace(CFG, patch_size=(1, 4, 4))
    ours, reference = ours_and_diffusers(cfg, seed=1)
    x = torch.randn(1, cfg.in_channels, 3, 16, 8)
    t = torch.tensor([700.0])
    text = padded_text(1)
    ours_out = ours.forward_bidirectional(x, t, text)
    assert ours_out.shape == x.shape
    assert (ours_out - reference(x, t, text, return_dict=False)[0]).abs().max() <= 1e-5
