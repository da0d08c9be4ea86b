"""`tether bench binding`: does a flow-matching transformer use each word of its prompt?

`bench adherence` scores what a model draws, through sampling, the VAE's
decoder and the probe. This asks the transformer alone. A held-out world clip
is encoded and noised at a few fixed timesteps, and the model predicts its flow
under the clip's own prompt and under the same prompt with one word swapped
for each alternative value ("a red circle" -> "a blue circle", ...). A model
that binds the word predicts the flow best under the true prompt, on the
latent pixels the word is about: the subject's for shape, colour, pattern and
size; the rest of the frame for the background. The score is how often the
true value wins (chance: one over the number of values; a tie, which is what
a model blind to the word gives, counts as a miss).

Every candidate prompt sees the same latents and the same noise, so the word
is the only difference. No guidance: this is the conditional model itself.
A word about one of two objects is judged on the pixels only that object
covers.
"""

import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..errors import TetherError
from ..world.prompts import one_word_variants
from ..world.vocab import ATTRIBUTE_VALUES, BACKGROUNDS
from .adherence import ATTRIBUTES, CLIP_FRAMES

# Clips come from this stream by default: the toy chain's dataset uses stream 0, so these were never trained on.
HELD_OUT_STREAM = 1
DEFAULT_TIMESTEPS = (250, 500, 750)


def object_masks(truths, latent_shape, size: int, temporal_stride: int) -> list:
    """Per object, the latent pixels it covers and no other object does: bool [F, H, W] each."""
    from ..train.toy_data import object_mask

    ids = sorted({o.id for t in truths for o in t.objects})
    alone = [object_mask([dataclasses.replace(t, objects=tuple(o for o in t.objects if o.id == i)) for t in truths],
                         *latent_shape, size=size, temporal_stride=temporal_stride) for i in ids]
    return [mask & ~torch.stack([m for j, m in enumerate(alone) if j != k]).any(dim=0) if len(alone) > 1 else mask
            for k, mask in enumerate(alone)]


@torch.inference_mode()
def flow_errors(model, latents, text, timesteps, noises, batch_size: int = 32) -> torch.Tensor:
    """Squared flow error per latent pixel [P, T, F, H, W] of latents [C, F, H, W] under each text [P, L, D]."""
    rows = []
    for timestep, noise in zip(timesteps, noises):
        sigma = timestep / 1000.0
        noisy = (1 - sigma) * latents + sigma * noise
        target = noise - latents
        per_prompt = []
        for first in range(0, len(text), batch_size):
            part = text[first:first + batch_size]
            t = torch.full((len(part),), float(timestep))
            flow = model.forward_bidirectional(noisy.expand(len(part), *noisy.shape), t, part)
            per_prompt.append(((flow.float() - target) ** 2).mean(dim=1))
        rows.append(torch.cat(per_prompt))
    return torch.stack(rows, dim=1)


def score_clip(model, text_encoder, latents, masks, prompt, timesteps, generator) -> list:
    """[{"attribute", "object", "correct", "correct_at": {timestep: bool}}] for each word `prompt` lets us test.

    `masks`: each object's latent pixels (see object_masks). A word about an
    object is judged on that object's pixels, the background on the pixels of
    no object; a test whose region is empty is skipped.
    """
    no_object = ~torch.stack(masks).any(dim=0)

    def region(index):
        return no_object if index is None else masks[index]

    tests = {key: test for key, test in one_word_variants(prompt).items() if region(key[1]).any()}
    if not tests:
        return []
    prompts = sorted({p for _, variants in tests.values() for p in variants})
    row = {p: i for i, p in enumerate(prompts)}
    noises = [torch.randn(latents.shape, generator=generator) for _ in timesteps]
    errors = flow_errors(model, latents, text_encoder.encode(prompts).float(), timesteps, noises)
    results = []
    for (name, index), (truth, variants) in tests.items():
        per_step = errors[[row[p] for p in variants]][..., region(index)].mean(dim=-1)  # [values, T]
        results.append({"attribute": name, "object": index, "correct": _wins(per_step.sum(dim=1), truth),
                        "correct_at": {int(t): _wins(per_step[:, k], truth) for k, t in enumerate(timesteps)}})
    return results


def _wins(errors: torch.Tensor, truth: int) -> bool:
    """The true value's error is strictly the lowest: a model blind to the word ties, and a tie is a miss."""
    others = torch.cat([errors[:truth], errors[truth + 1:]])
    return bool(errors[truth] < others.min())


def summarise(clips: list, timesteps) -> dict:
    summary = {}
    for name in ATTRIBUTES:
        scored = [test for c in clips for test in c["tests"] if test["attribute"] == name]
        wins = np.array([s["correct"] for s in scored], dtype=float)
        values = BACKGROUNDS if name == "background" else ATTRIBUTE_VALUES[name]
        summary[name] = {
            "accuracy": float(wins.mean()) if len(wins) else None,
            "stderr": float(wins.std(ddof=1) / np.sqrt(len(wins))) if len(wins) > 1 else None,
            "tests": len(wins), "chance": 1 / len(values),
            "accuracy_at": {int(t): float(np.mean([s["correct_at"][int(t)] for s in scored])) if scored else None
                            for t in timesteps},
        }
    return summary


def run(checkpoint=None, transformer_path=None, clips: int = 100, seed: int = HELD_OUT_STREAM,
        timesteps=DEFAULT_TIMESTEPS, progress: bool = True) -> dict:
    from ..checkpoints import load_transformer
    from ..pipeline import load_pipeline
    from ..train.toy_data import clips_to_video, sample_clip

    if clips < 1:
        raise TetherError("--clips must be at least 1")
    if not timesteps or any(not 0 < t < 1000 for t in timesteps):
        raise TetherError(f"timesteps must lie strictly between 0 and 1000, got {list(timesteps)}")
    if transformer_path is None:
        transformer_path = _bundle_teacher(checkpoint)
    pipe = load_pipeline(checkpoint)
    model = load_transformer(str(transformer_path)).float().eval()
    generator = torch.Generator().manual_seed(seed)
    started = time.perf_counter()
    scored = []
    for index in tqdm(range(clips), desc="binding", unit="clip", disable=not progress):
        frames, prompt, truths = sample_clip(seed, index, CLIP_FRAMES, pipe.height,
                                             with_truth=True)
        with torch.inference_mode():
            latents = pipe.codec.encode(clips_to_video([frames]))[0].float()
        masks = object_masks(truths, latents.shape[1:], pipe.height, pipe.codec.temporal_stride)
        tests = score_clip(model, pipe.text_encoder, latents, masks, prompt, timesteps, generator)
        scored.append({"prompt": prompt, "tests": tests})
    return {"model": pipe.description, "checkpoint": str(checkpoint) if checkpoint else "built-in",
            "transformer": str(transformer_path), "clips": clips, "seed": seed, "timesteps": list(timesteps),
            "seconds": round(time.perf_counter() - started, 1),
            "binding": summarise(scored, timesteps), "per_clip": scored}


def _bundle_teacher(checkpoint) -> Path:
    """The bundle's bidirectional teacher: only a teacher is trained on whole noised clips."""
    from ..pipeline import bundle_folder

    path = bundle_folder(checkpoint) / "teacher.safetensors"
    if not path.exists():
        raise TetherError(f"{path.parent} has no teacher.safetensors: pass the transformer to test with --transformer")
    return path


def format_report(report: dict) -> str:
    timesteps = report["timesteps"]
    lines = [f"{'attribute':<12}{'true word wins':>18}{'chance':>9}{'tests':>7}"
             + "".join(f"{'t=' + str(t):>8}" for t in timesteps)]
    for name, entry in report["binding"].items():
        if entry["accuracy"] is None:
            lines.append(f"{name:<12}{'-':>18}{100 * entry['chance']:>8.1f}%{0:>7}")
            continue
        error = f" ±{100 * entry['stderr']:.1f}" if entry["stderr"] is not None else ""
        accuracy = f"{100 * entry['accuracy']:.1f}%{error}"
        lines.append(f"{name:<12}{accuracy:>18}{100 * entry['chance']:>8.1f}%"
                     f"{entry['tests']:>7}" + "".join(f"{100 * entry['accuracy_at'][t]:>7.1f}%" for t in timesteps))
    return "\n".join(lines)


def main(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    timesteps = tuple(int(t) for t in args.timesteps.split(",")) if args.timesteps else DEFAULT_TIMESTEPS
    report = run(args.checkpoint, args.transformer, clips=args.clips, seed=args.seed, timesteps=timesteps,
                 progress=not args.quiet)
    print(format_report(report))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    return 0
