"""`tether bench texture`: how much of the world's stripes and dots a VAE's round trip keeps.

Each test clip is rendered twice from the same seed, with a patterned subject
and with a solid one; everything but the fill is identical, so their
difference S is the pattern alone. After a round trip through the VAE the
same difference D is what the decoder draws of it. Two gains, each
<D, S> / <S, S> (1: kept as rendered; 0: lost):

  fill gain     over the whole difference, which includes the pattern's mean
                (stripes darken the fill on average; dots lighten it), the
                part a flat fill of the right shade already carries;
  texture gain  over the pattern's fundamental alone: its Fourier component
                at the stripe period along the stripes' normal, or at the dot
                spacing along x and y. This is the pattern a viewer (or the
                probe) sees.

`--scales` renders the patterns coarser (tether.world.render.pattern_scale),
which says how coarse a pattern this VAE's latent grid can carry. Periods are
given along the frame's axes: the world's stripes are diagonal, so across them
the period is 1/sqrt(2) of that (3.5 px at the world's own 5 px).
"""

import json
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

PROMPTS = ("a {size} red {pattern} square rests on grass", "a {size} blue {pattern} circle bounces in the desert",
           "a {size} yellow {pattern} star drifts left in the snow", "a {size} purple {pattern} triangle rests by a brick wall")
FRAMES = 41
SKIP_FRAMES = 9  # the first latent frames decode from cold causal caches; the pattern is judged on the rest


def texture_gain(rendered: np.ndarray, decoded: np.ndarray, pattern: str, period: float) -> float:
    """<D, S> / <S, S> of the two pattern differences [T, H, W, 3] at the pattern's fundamental frequency."""
    height, width = rendered.shape[1:3]
    ys, xs = np.mgrid[0:height, 0:width] + 0.5
    if pattern == "striped":  # the world's stripes change phase along x + y
        waves = [np.exp(-2j * np.pi * (xs + ys) / period)]
    else:
        waves = [np.exp(-2j * np.pi * xs / period), np.exp(-2j * np.pi * ys / period)]
    kept = total = 0.0
    for wave in waves:
        a_rendered = np.einsum("thwc,hw->tc", rendered, wave)
        a_decoded = np.einsum("thwc,hw->tc", decoded, wave)
        kept += float((a_decoded * np.conj(a_rendered)).real.sum())
        total += float((np.abs(a_rendered) ** 2).sum())
    return kept / total


def run(checkpoint=None, scales=(1.0,), seeds: int = 2, prompts: int = len(PROMPTS), progress: bool = True) -> dict:
    from ..pipeline import load_pipeline
    from ..world import render_clip
    from ..world.render import DOT_PERIOD, STRIPE_PERIOD, pattern_scale
    from .adherence import vae_round_trip

    pipe = load_pipeline(checkpoint)

    def round_trip(frames):
        return vae_round_trip(pipe, frames)[0].astype(np.float32)

    rows = []
    cases = [(p, s, z) for p in ("striped", "dotted") for s in scales for z in ("small", "large")]
    for pattern, scale, size in tqdm(cases, desc="texture", unit="case", disable=not progress):
        period = (STRIPE_PERIOD if pattern == "striped" else DOT_PERIOD) * scale * pipe.width / 64
        fill, texture = [], []
        for template in PROMPTS[:prompts]:
            for seed in range(seeds):
                with pattern_scale(scale):
                    patterned, _ = render_clip(template.format(size=size, pattern=pattern), FRAMES, seed=seed, size=pipe.width)
                solid, _ = render_clip(template.format(size=size, pattern="solid"), FRAMES, seed=seed, size=pipe.width)
                rendered = (patterned.astype(np.float32) - solid.astype(np.float32))[SKIP_FRAMES:]
                decoded = (round_trip(patterned) - round_trip(solid))[SKIP_FRAMES:]
                fill.append(float((decoded * rendered).sum() / (rendered * rendered).sum()))
                texture.append(texture_gain(rendered, decoded, pattern, period))
        rows.append({"pattern": pattern, "scale": scale, "period_px": period, "size": size,
                     "fill_gain": float(np.mean(fill)), "texture_gain": float(np.mean(texture)), "clips": len(fill)})
    return {"model": pipe.description, "checkpoint": str(checkpoint) if checkpoint else "built-in",
            "frames": FRAMES, "scored_from_frame": SKIP_FRAMES, "rows": rows}


def format_report(report: dict) -> str:
    lines = [f"{'pattern':<9}{'period':>8}{'size':>7}{'fill gain':>11}{'texture gain':>14}"]
    for row in report["rows"]:
        lines.append(f"{row['pattern']:<9}{row['period_px']:>6.1f}px{row['size']:>7}"
                     f"{row['fill_gain']:>11.2f}{row['texture_gain']:>14.2f}")
    return "\n".join(lines)


def main(args) -> int:
    from ..errors import TetherError

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        scales = tuple(float(s) for s in args.scales.split(","))
    except ValueError:
        raise TetherError(f"--scales is a comma-separated list of numbers, got {args.scales!r}") from None
    if any(s <= 0 for s in scales):
        raise TetherError(f"--scales must be positive, got {args.scales!r}")
    if not 1 <= args.prompts <= len(PROMPTS):
        raise TetherError(f"--prompts is 1 to {len(PROMPTS)}, got {args.prompts}")
    report = run(args.checkpoint, scales=scales, seeds=args.seeds, prompts=args.prompts, progress=not args.quiet)
    print(format_report(report))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    return 0
