"""`tether bench cost`: each policy's per-chunk cost against `window` at the same cache size.

A policy's bookkeeping (surprisal tests, anchor choice, re-indexing, RoPE on
moved slots) must not make a chunk measurably slower than a plain sliding
window holding as many frames. Both run the same model on the same random
weights; rounds alternate between the two so that machine noise hits both.
Timings are taken after the cache is full (steady state).
"""

import json
import statistics
import time
from pathlib import Path

import torch

from ..configs import get_config
from ..errors import TetherError
from ..memory import POLICIES, make_policy
from ..model import WanTransformer
from ..stream import Stream

STEADY_AFTER = 40  # chunks; enough to fill every policy's memory (slow-fast needs ~30)


def _time_chunks(model, policy, latent_shape, text, chunks: int) -> list:
    stream = Stream(model, policy, lambda prompt: text, latent_shape, seed=0)
    stream.set_prompt("p")
    for _ in range(STEADY_AFTER):
        stream.step()
    times = []
    for _ in range(chunks):
        start = time.perf_counter()
        stream.step()
        times.append((time.perf_counter() - start) * 1000)
    return times, stream.policy.num_cached_frames()


def measure(config: str = "toy", latent_hw=(8, 8), chunks: int = 20, rounds: int = 3, policies=None) -> dict:
    cfg = get_config(config)
    torch.manual_seed(0)
    model = WanTransformer(cfg).eval()
    text = torch.randn(1, cfg.text_len, cfg.text_dim)
    latent_shape = (cfg.in_channels, *latent_hw)
    results = {}
    for name in policies or [p for p in POLICIES if p != "window"]:
        if name not in POLICIES:
            raise TetherError(f"unknown policy '{name}'")
        ours, base, cached = [], [], None
        for _ in range(rounds):
            times, cached = _time_chunks(model, make_policy(name), latent_shape, text, chunks)
            ours += times
            baseline, _ = _time_chunks(model, make_policy("window", window=cached), latent_shape, text, chunks)
            base += baseline
        median, base_median = statistics.median(ours), statistics.median(base)
        results[name] = {"cached_frames": cached, "chunk_ms": round(median, 3), "window_chunk_ms": round(base_median, 3),
                         "ratio": round(median / base_median, 4)}
    return {"config": config, "latent_hw": list(latent_hw), "tokens_per_frame": model.tokens_per_frame(*latent_hw),
            "threads": torch.get_num_threads(), "chunks_per_round": chunks, "rounds": rounds, "policies": results}


@torch.no_grad()  # not set_grad_enabled(False): main may run in-process and must not leak the mode
def main(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    report = measure(args.config, (args.latent, args.latent), args.chunks, args.rounds, args.policy or None)
    print(f"per-chunk cost vs window at the same cache size ({report['config']}, {report['tokens_per_frame']} tokens/frame, "
          f"{report['threads']} threads, median of {report['rounds']}x{report['chunks_per_round']} chunks)")
    print(f"{'policy':<15}{'cached':>7}{'ms/chunk':>10}{'window':>9}{'ratio':>8}")
    for name, r in report["policies"].items():
        print(f"{name:<15}{r['cached_frames']:>7}{r['chunk_ms']:>10.2f}{r['window_chunk_ms']:>9.2f}{r['ratio']:>8.3f}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0
