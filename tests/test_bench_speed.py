"""`tether bench speed` and the analytic FLOP counter behind it.

No timing is asserted here: speed targets live in the benchmark's results,
not in tests that run on whatever machine is at hand.
"""

import json
import math
import subprocess
import sys

import pytest
import torch

from tether.cli import main
from tether.configs import get_config
from tether.flops import block_causal_flops, chunk_flops, forward_flops, forward_flops_by_part

REQUIRED_FIELDS = {
    "fps", "fps_including_warmup", "chunk_ms", "transformer_ms", "decode_ms", "peak_rss_mb", "peak_gpu_mb",
    "flops_per_chunk", "chunk_flops", "achieved_gflops", "matmul_peak_gflops", "device", "dtype", "policy", "config",
    "checkpoint", "seconds", "num_chunks", "frames", "latency_ratio_last_vs_first_minute", "latency_ratio_basis",
    "no_cache_fps", "no_cache_transformer_fps", "no_cache_flops_per_chunk", "no_cache_basis", "cpu_busy", "load_average",
}


def test_speed_benchmark_writes_every_field(tmp_path):
    out = tmp_path / "speed.json"
    result = subprocess.run(
        [sys.executable, "-m", "tether", "bench", "speed", "--config", "tiny", "--policy", "window", "--seconds", "3",
         "--no-cache-chunks", "2", "--quiet", "--json", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "fps" in result.stdout and "GFLOP/s" in result.stdout
    data = json.loads(out.read_text())
    assert REQUIRED_FIELDS <= set(data), REQUIRED_FIELDS - set(data)

    # 3 s of video = 4 chunks: 9 frames for the first, 12 for each later one.
    assert data["num_chunks"] == 4 and data["frames"] == 9 + 3 * 12
    assert len(data["chunk_ms"]) == len(data["transformer_ms"]) == len(data["decode_ms"]) == data["num_chunks"]
    assert all(ms > 0 for ms in data["chunk_ms"])
    assert data["fps"] > 0 and data["fps_including_warmup"] > 0 and data["no_cache_fps"] > 0
    assert data["achieved_gflops"] > 0 and data["matmul_peak_gflops"] > 0
    assert data["peak_rss_mb"] > 0 and data["peak_gpu_mb"] is None
    assert data["device"].startswith("cpu (") and data["dtype"] == "float32"
    assert data["policy"] == "window" and data["config"] == "tiny" and data["seconds"] == 3
    assert len(data["no_cache_chunk_ms"]) == 2
    assert data["latency_ratio_last_vs_first_minute"] > 0 and "third" in data["latency_ratio_basis"]

    # The window (9 latent frames) fills by 3 frames per chunk; the FLOP count follows the cache size.
    assert data["cached_frames"] == [0, 3, 6, 9]
    tokens = data["tokens_per_frame"]
    expected = [chunk_flops(get_config("tiny"), tokens, 3, cached, forwards=5) for cached in data["cached_frames"]]
    assert data["chunk_flops"] == expected
    # Without a cache the window is not full within 2 chunks: the timed chunk recomputes 3 + 3 frames, 4 times.
    assert data["no_cache_flops_per_chunk"] == 4 * block_causal_flops(get_config("tiny"), tokens, 6)


def test_block_causal_flops_is_the_sum_of_its_chunks():
    cfg = get_config("tiny")
    # 6 frames in 2 chunks of 3: the first sees 3 frames, the second all 6.
    assert block_causal_flops(cfg, 16, 6) == forward_flops(cfg, 48, 48) + forward_flops(cfg, 48, 96)


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--config", "tiny", "--policy", "nope"], "unknown policy"),
        (["--config", "no-such-config"], "unknown model config"),
        (["--config", "tiny", "--seconds", "0"], "positive"),
        (["--config", "tiny", "--seconds", "nan"], "positive"),
        (["--config", "tiny", "--json", "/no/such/dir/out.json"], "/no/such/dir"),
        (["--config", "tiny", "--checkpoint", "x.pt"], "not both"),
        (["--config", "tiny", "--height", "60"], "multiples of 16"),
        (["--config", "tiny", "--threads", "0"], "--threads"),
        (["--config", "tiny", "--seconds", "many"], "invalid float"),
    ],
)
def test_bad_input_is_one_line(capsys, args, fragment):
    assert main(["bench", "speed", "--quiet", *args]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and fragment in lines[0], lines


def test_bench_without_a_benchmark_name_is_one_line(capsys):
    assert main(["bench"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


# ----------------------------------------------------------------------------- FLOP counter


def test_flops_of_one_tiny_forward_by_hand():
    # tiny: dim 64, ffn 128, 2 layers, 4 latent channels, patch (1, 2, 2), 16 text tokens.
    # 3 query frames of 16 tokens (Q = 48) seeing 3 cached frames plus themselves (K = 96).
    cfg = get_config("tiny")
    parts = forward_flops_by_part(cfg, query_tokens=48, key_tokens=96)
    assert parts == {
        "patch_embedding": 2 * 48 * (4 * 1 * 2 * 2) * 64,  # 98_304
        "self_attention_projections": 2 * 4 * (2 * 48 * 64 * 64),  # layers * (q, k, v, o): 3_145_728
        "self_attention_scores": 2 * (2 * 2 * 48 * 96 * 64),  # layers * (QK^T + AV): 2_359_296
        "cross_attention_projections": 2 * 2 * (2 * 48 * 64 * 64),  # layers * (q, o): 1_572_864
        "cross_attention_scores": 2 * (2 * 2 * 48 * 16 * 64),  # 393_216
        "ffn": 2 * (2 * 48 * 64 * 128 + 2 * 48 * 128 * 64),  # 3_145_728
        "head": 2 * 48 * 64 * (1 * 2 * 2 * 4),  # 98_304
    }
    assert forward_flops(cfg, 48, 96) == 10_813_440
    assert chunk_flops(cfg, tokens_per_frame=16, chunk_frames=3, cached_frames=3, forwards=5) == 5 * 10_813_440


def test_flops_agree_with_torch_flop_counter_on_a_real_forward():
    """An independent count: torch's FlopCounterMode on a real cached forward of the tiny model.

    The math SDPA backend makes attention visible to it as bmm. Its total exceeds
    ours by exactly the per-frame time embedding MLP, which we leave out on purpose.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from tether.memory import make_policy
    from tether.memory.base import CachedFrame
    from tether.model.transformer import WanTransformer

    cfg = get_config("tiny")
    torch.manual_seed(0)
    model = WanTransformer(cfg).eval()
    heads, head_dim = cfg.num_heads, cfg.head_dim
    policy = make_policy("window")
    with torch.no_grad():
        text = model.encode_text(torch.randn(1, 5, cfg.text_dim))
        policy.commit([
            CachedFrame(i, torch.randn(1, 4, 8, 8), torch.randn(cfg.num_layers, 1, 16, heads, head_dim),
                        torch.randn(cfg.num_layers, 1, 16, heads, head_dim), (4, 4))
            for i in range(3)
        ])
        policy.advance(3)
        view = policy.view(3, model.rotate_keys)
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            model.forward_cached(torch.randn(1, 4, 3, 8, 8), 500.0, text, view.layout.query_positions, past=view)
    frames, d = 3, cfg.dim
    time_embedding = frames * 2 * (cfg.freq_dim * d + d * d + d * 6 * d)
    assert counter.get_total_flops() == forward_flops(cfg, 48, 96) + time_embedding


def test_wan_1_3b_matches_the_spec_per_frame_figure():
    """SPEC §7: ~1.2e13 FLOP per generated frame, "5 forwards of 4680 tokens over a 12-frame cache".

    Read as 12 frames of keys in all (9 cached + the 3-frame chunk, tether's
    default window) we get 1.18e13, within 2 %; read as 12 cached frames plus
    the chunk (15 frames of keys), 1.35e13, within 13 %.
    """
    cfg = get_config("wan2.1-t2v-1.3b")
    tokens = 1560  # 480x832 -> 60x104 latents -> 30x52 patches
    per_frame_12_keys = chunk_flops(cfg, tokens, 3, cached_frames=9, forwards=5) / 12
    per_frame_15_keys = chunk_flops(cfg, tokens, 3, cached_frames=12, forwards=5) / 12
    assert math.isclose(per_frame_12_keys, 1.2e13, rel_tol=0.02)
    assert math.isclose(per_frame_15_keys, 1.2e13, rel_tol=0.15)
