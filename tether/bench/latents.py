"""`tether bench latents`: what a VAE's latents keep of the world, before any decoder.

`bench adherence --reference` shows what survives a VAE round trip; this
tells whether a loss happened in the encoder or the decoder. A small CNN is
trained on the latent frames of an encoded toy dataset (`tether train toy`'s
`dataset` stage) to read the subject's shape, colour, pattern and size, and
is scored on held-out clips. Labels come from the world's ground truth for
the clip (which the dataset's stream seed and clip index reproduce), on
latent frames showing exactly one object, fully in view.

The report also gives the latents' standard deviation at each latent frame
index. A causal VAE trained from scratch can encode its first frames at a
smaller scale than its steady state (its temporal caches start empty); the
diffusion model then sees those frames at a lower signal-to-noise ratio at
every timestep.

If the latents classify an attribute well but the decoded frames do not,
the decoder is the limit and a decoder-only fine-tune fixes it without
retraining any transformer (`tether train vae model.train=decoder`); if the
latents do not, the encoder has thrown it away and the whole VAE (and every
model on its latents) must be retrained.
"""

import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from ..errors import TetherError
from ..world.vocab import COLOUR_NAMES, PATTERNS, SHAPES, SIZES

ATTRIBUTES = (("shape", SHAPES), ("colour", COLOUR_NAMES), ("pattern", PATTERNS), ("size", SIZES))
HELD_OUT_SHARE = 0.2  # the last clips of the dataset are the test set
FULLY_IN_VIEW = 0.9  # visible_fraction of the one object a labelled frame shows


def frame_labels(seed: int, clips: int, num_frames: int, temporal_stride: int = 4):
    """(clip, latent frame) pairs and their attribute indices [M, 4], from the world's ground truth.

    Latent frame k > 0 covers frames 4k-3..4k; it is labelled by frame 4k-2.
    """
    from ..train.toy_data import clip_truths

    latent_frames = 1 + (num_frames - 1) // temporal_stride
    shown = [0] + [temporal_stride * k - 2 for k in range(1, latent_frames)]
    where, labels = [], []
    for clip in range(clips):
        for k, truth in enumerate(clip_truths(seed, clip, num_frames, only=shown)):
            visible = [o for o in truth.objects if o.visible]
            if len(visible) == 1 and visible[0].visible_fraction >= FULLY_IN_VIEW:
                where.append((clip, k))
                labels.append([values.index(getattr(visible[0], name)) for name, values in ATTRIBUTES])
    return torch.tensor(where, dtype=torch.long).view(-1, 2), torch.tensor(labels, dtype=torch.long).view(-1, 4)


class LatentClassifier(nn.Module):
    """Three 3x3 convolutions and a max over positions (the subject may be anywhere), one head per attribute."""

    def __init__(self, channels: int, width: int = 96):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(width, width, 3, padding=1), nn.ReLU())
        self.heads = nn.ModuleList(nn.Linear(width, len(values)) for _, values in ATTRIBUTES)

    def forward(self, latents):
        features = self.body(latents).amax(dim=(2, 3))
        return [head(features) for head in self.heads]


def classify(inputs: torch.Tensor, labels: torch.Tensor, is_test: torch.Tensor, steps: int = 3000,
             batch_size: int = 128, seed: int = 0, progress: bool = True) -> dict:
    """Train on the frames not in `is_test`, return each attribute's held-out accuracy."""
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = LatentClassifier(inputs.shape[1])
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-4)
    train_inputs, train_labels = inputs[~is_test], labels[~is_test]
    if len(train_inputs) == 0 or not is_test.any():
        raise TetherError("too few labelled frames to train and test on: use more --clips")
    for step in tqdm(range(steps), desc="latent classifier", unit="step", disable=not progress):
        pick = torch.randint(len(train_inputs), (batch_size,), generator=generator)
        batch = train_inputs[pick]
        if step % 2:
            batch = batch.flip(-1)  # a mirrored frame has the same shape, colour, pattern and size
        loss = sum(F.cross_entropy(out, train_labels[pick, j]) for j, out in enumerate(net(batch)))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        outs = net(inputs[is_test])
    return {name: float((out.argmax(1) == labels[is_test, j]).float().mean())
            for j, ((name, _), out) in enumerate(zip(ATTRIBUTES, outs))}


def scale_by_frame(latents: torch.Tensor, clips: int = 1000) -> list:
    """Standard deviation of the (normalised) latents [N, C, F, h, w] at each latent frame index, over the first clips."""
    from ..vae import std_by_latent_frame

    return std_by_latent_frame(latents[:clips])


def run(dataset, clips: int | None = None, steps: int = 3000, progress: bool = True) -> dict:
    folder = Path(dataset)
    try:
        meta = json.loads((folder / "prompts.json").read_text())
        data = torch.load(folder / "latents.pt", map_location="cpu", weights_only=True)
    except (OSError, json.JSONDecodeError) as error:
        raise TetherError(f"{folder} is not an encoded toy dataset (latents.pt + prompts.json): {error}") from None
    latents = data["latents"]
    clips = min(clips or len(latents), len(latents))
    began = time.perf_counter()
    where, labels = frame_labels(int(meta["seed"]), clips, int(meta["num_frames"]))
    is_test = where[:, 0] >= round((1 - HELD_OUT_SHARE) * clips)
    inputs = latents[where[:, 0], :, where[:, 1]].float()
    accuracy = classify(inputs, labels, is_test, steps=steps, progress=progress)
    return {"dataset": str(folder), "clips": clips, "labelled_frames": len(labels), "test_frames": int(is_test.sum()),
            "steps": steps, "accuracy": accuracy,
            "chance": {name: 1 / len(values) for name, values in ATTRIBUTES},
            "std_by_latent_frame": scale_by_frame(latents, clips),
            "seconds": round(time.perf_counter() - began, 1)}


def format_report(report: dict) -> str:
    lines = [f"{report['test_frames']} held-out latent frames of {report['dataset']}",
             f"{'attribute':<12}{'accuracy':>10}{'chance':>10}"]
    for name, value in report["accuracy"].items():
        lines.append(f"{name:<12}{100 * value:>9.1f}%{100 * report['chance'][name]:>9.1f}%")
    lines.append("latent std by frame: " + " ".join(f"{v:.2f}" for v in report["std_by_latent_frame"]))
    return "\n".join(lines)


def main(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    report = run(args.dataset, clips=args.clips, steps=args.steps, progress=not args.quiet)
    print(format_report(report))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    return 0
