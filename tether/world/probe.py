"""tether.world.probe: a small CNN that reads toy-world frames back.

Per frame it reports the background and up to two objects, each with
presence, shape, colour, pattern, size and centre position. It is a tiny
single-scale detector: a 16x16 grid (one cell per 4x4 pixels at 64x64)
predicts, per cell, "an object's centre is here", the object's attributes
and the centre's offset within the cell; a global head predicts the background.

Slots. An object is *readable* when at least half of its area is drawn
(ObjectTruth.visible_fraction >= 0.5). Slots hold the readable objects in a
canonical order that does not depend on the scene spec and does not flip
when objects cross: by colour (vocabulary order), then shape, pattern, size,
and finally x. Slot 0 is the first of them; a slot without an object has
present=False. `truth_slots` applies the same rule to ground truth.

Training renders fresh random frames every step (infinite data), so the
model never sees the same frame twice; evaluation uses clip seeds from a
disjoint range (training: [0, 2^31), evaluation: [2^31, 2^32)).
"""

import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from tether.errors import TetherError

from .prompts import describe, random_scene
from .render import render_clip, seeded_rng
from .scene import SceneChange, ObjectSpec, Segment
from .vocab import BACKGROUNDS, COLOUR_NAMES, PATTERNS, SHAPES, SIZES

PROBE_SIZE = 64  # frames of other sizes are resized to this
GRID_STRIDE = 4  # pixels per grid cell
SLOTS = 2
READABLE_FRACTION = 0.5
# Objects this close to half visible are ambiguous: training ignores their
# presence, evaluation neither demands nor penalises a detection.
TRAIN_UNCERTAIN = (0.4, 0.6)
EVAL_UNCERTAIN = (0.3, 0.7)
MATCH_RADIUS = 6.0  # px at 64x64: a detection this close to a true centre is that object
ATTRIBUTES = (("shape", SHAPES), ("colour", COLOUR_NAMES), ("pattern", PATTERNS), ("size", SIZES))
TRAIN_CLIP_SEEDS = (0, 2**31)
EVAL_CLIP_SEEDS = (2**31, 2**32)
WEIGHTS_FILE, CONFIG_FILE = "probe.safetensors", "probe.json"


def slot_key(shape: str, colour: str, pattern: str, size: str, x: float) -> tuple:
    """Sort key of the canonical slot order (colour, shape, pattern, size, x)."""
    return (COLOUR_NAMES.index(colour), SHAPES.index(shape), PATTERNS.index(pattern), SIZES.index(size), x)


def truth_slots(truth, min_fraction: float = READABLE_FRACTION) -> list:
    """The ObjectTruths a perfect probe puts in its slots, in slot order."""
    readable = [o for o in truth.objects if o.visible_fraction >= min_fraction]
    return sorted(readable, key=lambda o: slot_key(o.shape, o.colour, o.pattern, o.size, o.x))[:SLOTS]


# ============================================================================ network


def _conv(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride, padding=dilation, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class _Residual(nn.Module):
    def __init__(self, width: int, dilation: int):
        super().__init__()
        self.conv = _conv(width, width, dilation=dilation)

    def forward(self, x):
        return x + self.conv(x)


class ProbeNet(nn.Module):
    """Frames [B, 3, 64, 64] in [-0.5, 0.5] -> (cell map [B, C, 16, 16], background logits [B, 6])."""

    def __init__(self, width: int = 48, dilations: tuple = (1, 2, 4)):
        super().__init__()
        self.stem = nn.Sequential(_conv(3, 24, stride=2), _conv(24, 32), _conv(32, width, stride=2))
        # Dilations widen the receptive field to the whole frame: a large star spans 7 cells.
        self.body = nn.Sequential(*[_Residual(width, d) for d in dilations])
        channels = 1 + sum(len(v) for _, v in ATTRIBUTES) + 2
        self.cells = nn.Sequential(nn.Conv2d(width, width, 1), nn.ReLU(inplace=True), nn.Conv2d(width, channels, 1))
        self.background = nn.Linear(width, len(BACKGROUNDS))

    def forward(self, x):
        features = self.body(self.stem(x))
        return self.cells(features), self.background(features.mean(dim=(2, 3)))


def _split(cells):
    """Cell map -> objectness logits [B,G,G], {attribute: logits [B,K,G,G]}, offsets [B,2,G,G]."""
    objectness, start, logits = cells[:, 0], 1, {}
    for name, values in ATTRIBUTES:
        logits[name] = cells[:, start:start + len(values)]
        start += len(values)
    return objectness, logits, cells[:, start:start + 2]


def _to_input(frames) -> torch.Tensor:
    """uint8 [T, H, W, 3] (numpy or torch) -> float [T, 3, 64, 64] in [-0.5, 0.5]."""
    x = torch.as_tensor(np.asarray(frames) if not torch.is_tensor(frames) else frames)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise TetherError(f"the probe reads frames shaped [T, H, W, 3], got {tuple(x.shape)}")
    x = x.permute(0, 3, 1, 2).float() / 255.0 - 0.5
    if x.shape[-2:] != (PROBE_SIZE, PROBE_SIZE):
        x = F.interpolate(x, size=(PROBE_SIZE, PROBE_SIZE), mode="bilinear", antialias=True, align_corners=False)
    return x


# ============================================================================ reading


class Probe:
    """A trained probe. `read(frames)` gives one dict per frame (see `read`)."""

    def __init__(self, net: ProbeNet, config: dict):
        self.net = net.eval()
        self.config = config

    @torch.no_grad()
    def read(self, frames, batch_size: int = 256, threshold: float = 0.5) -> list:
        """Readings of uint8 frames [T, H, W, 3] (any square size; positions come back in that size's pixels).

        Each reading: {"background": str, "objects": [slot 0, slot 1]}, a slot
        being {"present", "shape", "colour", "pattern", "size", "x", "y", "score"}
        (attributes None when absent). See the module docstring for slot order.
        """
        frames = np.asarray(frames) if not torch.is_tensor(frames) else frames
        scale = frames.shape[2] / PROBE_SIZE
        readings = []
        for start in range(0, len(frames), batch_size):
            cells, background = self.net(_to_input(frames[start:start + batch_size]))
            objectness, logits, offsets = _split(cells)
            scores = torch.sigmoid(objectness)
            peaks = (scores == F.max_pool2d(scores[:, None], 3, 1, 1)[:, 0]) & (scores > threshold)
            classes = {name: l.argmax(1) for name, l in logits.items()}
            for b in range(len(scores)):
                found = []
                for i, j in peaks[b].nonzero().tolist():
                    x = (j + 0.5 + offsets[b, 0, i, j].item()) * GRID_STRIDE * scale
                    y = (i + 0.5 + offsets[b, 1, i, j].item()) * GRID_STRIDE * scale
                    found.append({
                        "present": True,
                        **{name: values[classes[name][b, i, j].item()] for name, values in ATTRIBUTES},
                        "x": x, "y": y, "score": scores[b, i, j].item(),
                    })
                found = sorted(found, key=lambda d: -d["score"])[:SLOTS]
                found.sort(key=lambda d: slot_key(d["shape"], d["colour"], d["pattern"], d["size"], d["x"]))
                empty = {"present": False, **{name: None for name, _ in ATTRIBUTES}, "x": None, "y": None, "score": 0.0}
                found += [dict(empty) for _ in range(SLOTS - len(found))]
                readings.append({"background": BACKGROUNDS[background[b].argmax().item()], "objects": found})
        return readings


# ============================================================================ data


def _sample_frames(rng, count: int, clip_seeds: tuple, clip_frames: int = 48, per_clip: int = 8):
    """`count` frames (uint8 [count,64,64,3]) with truths, `per_clip` random frames from each random clip.

    One clip in eight scripts its objects out of view, so that empty frames
    and objects half across an edge are common enough to learn.
    """
    frames, truths = [], []
    while len(truths) < count:
        scene = random_scene(rng)
        clip_seed = int(rng.integers(*clip_seeds))
        if rng.random() < 0.125:
            source = [Segment(describe(scene), 1.0)]
            for spec in scene.objects:
                source.append(Segment(describe(SceneChange(target=ObjectSpec(shape=spec.shape), motion="away")), 2.0))
            length = sum(s.frames for s in source)
        else:
            source, length = scene, clip_frames
        only = np.sort(rng.choice(length, size=per_clip, replace=False))
        f, t = render_clip(source, length, seed=clip_seed, size=PROBE_SIZE, only=only)
        frames.append(f)
        truths.extend(t)
    return np.concatenate(frames)[:count], truths[:count]


def _targets(truths) -> dict:
    """Training targets for one batch of FrameTruths (64x64)."""
    grid = PROBE_SIZE // GRID_STRIDE
    n = len(truths)
    objectness = np.zeros((n, grid, grid), np.float32)
    objectness_weight = np.ones((n, grid, grid), np.float32)
    classes = {name: np.zeros((n, grid, grid), np.int64) for name, _ in ATTRIBUTES}
    cell_weight = np.zeros((n, grid, grid), np.float32)
    offsets = np.zeros((n, 2, grid, grid), np.float32)
    background = np.array([BACKGROUNDS.index(t.background) for t in truths])
    for b, truth in enumerate(truths):
        # Most visible last, so that it owns the cells two objects share.
        for o in sorted(truth.objects, key=lambda o: o.visible_fraction):
            fraction = o.visible_fraction
            if fraction < TRAIN_UNCERTAIN[0]:
                continue
            ci = min(max(int(o.y // GRID_STRIDE), 0), grid - 1)
            cj = min(max(int(o.x // GRID_STRIDE), 0), grid - 1)
            rows = slice(max(ci - 1, 0), min(ci + 2, grid))
            cols = slice(max(cj - 1, 0), min(cj + 2, grid))
            # Neighbours of the centre cell are neither positive nor negative:
            # near a cell border either one may fire, and decoding keeps the peak.
            objectness_weight[b, rows, cols] = 0.0
            if fraction >= TRAIN_UNCERTAIN[1]:
                objectness[b, ci, cj] = 1.0
                objectness_weight[b, ci, cj] = 1.0
            for name, values in ATTRIBUTES:
                classes[name][b, rows, cols] = values.index(getattr(o, name))
            weights = np.full((rows.stop - rows.start, cols.stop - cols.start), 0.5, np.float32)
            weights[ci - rows.start, cj - cols.start] = 1.0
            cell_weight[b, rows, cols] = weights
            centres_x = np.arange(cols.start, cols.stop) + 0.5
            centres_y = np.arange(rows.start, rows.stop) + 0.5
            offsets[b, 0, rows, cols] = (o.x / GRID_STRIDE - centres_x)[None, :]
            offsets[b, 1, rows, cols] = (o.y / GRID_STRIDE - centres_y)[:, None]
    out = dict(objectness=objectness, objectness_weight=objectness_weight, cell_weight=cell_weight,
               offsets=offsets, background=background, **{f"class_{k}": v for k, v in classes.items()})
    return {k: torch.from_numpy(v) for k, v in out.items()}


def _augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Mild blur and noise, so that the probe also reads slightly soft generated frames."""
    n = x.shape[0]
    blur = torch.rand(n, generator=generator) < 0.25
    if blur.any():
        soft = F.avg_pool2d(F.pad(x[blur], (1, 1, 1, 1), mode="replicate"), 3, 1)
        mix = torch.rand(int(blur.sum()), 1, 1, 1, generator=generator)
        x[blur] = x[blur] * (1 - mix) + soft * mix
    noisy = torch.rand(n, 1, 1, 1, generator=generator) < 0.5
    sigma = torch.rand(n, 1, 1, 1, generator=generator) * (6 / 255) * noisy
    return x + torch.randn(x.shape, generator=generator) * sigma


def _loss(net: ProbeNet, x: torch.Tensor, targets: dict) -> tuple:
    cells, background = net(x)
    objectness, logits, offsets = _split(cells)
    # Focal loss: the grid is ~250 empty cells per object.
    p = torch.sigmoid(objectness)
    target = targets["objectness"]
    bce = F.binary_cross_entropy_with_logits(objectness, target, reduction="none")
    p_true = p * target + (1 - p) * (1 - target)
    focal = (1 - p_true) ** 2 * bce * targets["objectness_weight"]
    positives = target.sum().clamp(min=1.0)
    loss_objectness = focal.sum() / positives
    weight = targets["cell_weight"]
    weight_sum = weight.sum().clamp(min=1.0)
    loss_classes = sum(
        (F.cross_entropy(logits[name], targets[f"class_{name}"], reduction="none") * weight).sum() / weight_sum
        for name, _ in ATTRIBUTES
    )
    offset_error = F.smooth_l1_loss(offsets, targets["offsets"], reduction="none", beta=0.1).sum(1)
    loss_offsets = (offset_error * weight).sum() / weight_sum
    loss_background = F.cross_entropy(background, targets["background"])
    total = loss_objectness + loss_classes + 2.0 * loss_offsets + loss_background
    parts = dict(obj=loss_objectness.item(), cls=loss_classes.item(), off=loss_offsets.item(),
                 bg=loss_background.item())
    return total, parts


# ============================================================================ train / save / load


def _save(net: ProbeNet, config: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in net.state_dict().items()}
    save_file(tensors, str(out_dir / WEIGHTS_FILE))
    (out_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")


def _vocabulary_config() -> dict:
    return {"backgrounds": list(BACKGROUNDS), **{name: list(values) for name, values in ATTRIBUTES}}


def train_probe(out_path, steps: int = 5000, seed: int = 0, batch_size: int = 32, lr: float = 2e-3,
                width: int = 48, dilations: tuple = (1, 2, 4), frames_per_clip: int = 8, save_every: int = 1000,
                progress: bool = True) -> Probe:
    """Train a probe on freshly rendered frames and save it to the folder `out_path`.

    Writes probe.safetensors (fp16) and probe.json (architecture, class lists,
    training settings), every `save_every` steps and at the end, so an
    interrupted run keeps its last checkpoint. AdamW with a cosine schedule.
    """
    out_dir = Path(out_path)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    rng = seeded_rng(int(seed), "probe-train")
    net = ProbeNet(width, tuple(dilations))
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    warmup = min(200, max(1, steps // 10))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    config = {
        "format": "tether-world-probe", "version": 1, "width": width, "dilations": list(dilations),
        "size": PROBE_SIZE, "stride": GRID_STRIDE,
        "classes": _vocabulary_config(), "readable_fraction": READABLE_FRACTION,
        "train": {"steps": steps, "seed": seed, "batch_size": batch_size, "lr": lr, "frames_per_clip": frames_per_clip},
    }
    started = time.time()
    net.train()
    bar = tqdm(range(steps), desc="probe", disable=not progress, mininterval=2.0)
    for step in bar:
        frames, truths = _sample_frames(rng, batch_size, TRAIN_CLIP_SEEDS, per_clip=frames_per_clip)
        x = _augment(_to_input(frames), generator)
        loss, parts = _loss(net, x, _targets(truths))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}", **{k: f"{v:.3f}" for k, v in parts.items()})
        if save_every and (step + 1) % save_every == 0 and step + 1 < steps:
            config["train"]["completed_steps"] = step + 1
            _save(net, config, out_dir)
    config["train"]["completed_steps"] = steps
    config["train"]["seconds"] = round(time.time() - started, 1)
    _save(net, config, out_dir)
    return Probe(net.eval(), config)


def load_probe(path) -> Probe:
    """Load a probe saved by train_probe (the folder, or its probe.safetensors / probe.json)."""
    path = Path(path)
    if not path.exists():
        raise TetherError(f"no probe at {path}")
    folder = path if path.is_dir() else path.parent
    weights, config_file = folder / WEIGHTS_FILE, folder / CONFIG_FILE
    if not weights.is_file() or not config_file.is_file():
        raise TetherError(f"no probe at {folder} (expected {WEIGHTS_FILE} and {CONFIG_FILE})")
    config = json.loads(config_file.read_text())
    if config.get("format") != "tether-world-probe":
        raise TetherError(f"{config_file} is not a tether world probe config")
    if config.get("classes") != _vocabulary_config() or config.get("size") != PROBE_SIZE:
        raise TetherError(f"the probe at {folder} was trained on a different world vocabulary; retrain it")
    net = ProbeNet(config["width"], tuple(config["dilations"]))
    state = {k: v.float() if v.is_floating_point() else v for k, v in load_file(str(weights)).items()}
    net.load_state_dict(state)
    return Probe(net, config)


# ============================================================================ evaluation


def gaussian_blur(frames: np.ndarray, sigma: float) -> np.ndarray:
    """uint8 frames [T, H, W, 3] blurred by a Gaussian of `sigma` px (edges replicated), rounded back to uint8."""
    if sigma <= 0:
        return frames
    radius = int(math.ceil(3 * sigma))
    taps = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-taps**2 / (2 * sigma**2))
    kernel = (kernel / kernel.sum()).float()
    x = torch.from_numpy(np.ascontiguousarray(frames)).float().permute(0, 3, 1, 2)
    x = F.pad(x, (radius,) * 4, mode="replicate")
    x = F.conv2d(x, kernel.view(1, 1, 1, -1).repeat(3, 1, 1, 1), groups=3)
    x = F.conv2d(x, kernel.view(1, 1, -1, 1).repeat(3, 1, 1, 1), groups=3)
    return x.round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()


def evaluate_probe(probe: Probe, n_frames: int = 2000, seed: int = 0, blur: float = 0.0) -> dict:
    """Per-attribute accuracy on `n_frames` held-out rendered frames (64x64).

    `blur` > 0 reads the frames through a Gaussian blur of that many px and
    also reports the blurred frames' PSNR: how sharp a VAE or generator must
    be for the probe to read each attribute, in the dB that VAE PSNR is quoted in.

    - background: per frame.
    - presence: per true object clearly in (>= 70% drawn) or clearly out
      (< 30% drawn, including off-frame) plus one decision per spurious
      detection; objects 30-70% drawn are skipped and counted.
    - shape / colour / pattern / size / position: on clearly present objects
      matched to a detection within 6 px; position as "within 1 px / 2 px".
    - slots_exact: frames without ambiguous objects whose whole reading
      (every slot's presence and attributes, positions within 2 px) is right.
    """
    rng = seeded_rng(int(seed), "probe-eval")
    frames, truths = _sample_frames(rng, n_frames, EVAL_CLIP_SEEDS)
    seen = gaussian_blur(frames, blur)
    readings = probe.read(seen)
    tally = {k: [0, 0] for k in ("background", "presence", "shape", "colour", "pattern", "size", "slots_exact")}
    errors, skipped, spurious = [], 0, 0

    def score(name, ok):
        tally[name][0] += int(ok)
        tally[name][1] += 1

    for truth, reading in zip(truths, readings):
        score("background", reading["background"] == truth.background)
        detections = [d for d in reading["objects"] if d["present"]]
        claimed = set()
        ambiguous = False
        for o in sorted(truth.objects, key=lambda o: -o.visible_fraction):
            distances = [math.hypot(d["x"] - o.x, d["y"] - o.y) if k not in claimed else math.inf
                         for k, d in enumerate(detections)]
            nearest = int(np.argmin(distances)) if distances else -1
            matched = nearest >= 0 and distances[nearest] <= MATCH_RADIUS
            if matched:
                claimed.add(nearest)
            if EVAL_UNCERTAIN[0] <= o.visible_fraction < EVAL_UNCERTAIN[1]:
                skipped += 1
                ambiguous = True
                continue
            present = o.visible_fraction >= EVAL_UNCERTAIN[1]
            score("presence", matched == present)
            if present and matched:
                d = detections[nearest]
                for name, _ in ATTRIBUTES:
                    score(name, d[name] == getattr(o, name))
                errors.append(distances[nearest])
        for k in range(len(detections)):
            if k not in claimed:
                spurious += 1
                score("presence", False)
        if not ambiguous:
            expected = truth_slots(truth)
            ok = all(
                (d["present"] == (k < len(expected)))
                and (k >= len(expected) or (
                    all(d[name] == getattr(expected[k], name) for name, _ in ATTRIBUTES)
                    and math.hypot(d["x"] - expected[k].x, d["y"] - expected[k].y) <= 2.0))
                for k, d in enumerate(reading["objects"])
            )
            score("slots_exact", ok)
    errors = np.array(errors) if errors else np.array([np.nan])
    result = {name: (hit / total if total else float("nan")) for name, (hit, total) in tally.items()}
    result.update({
        "position_within_1px": float(np.mean(errors <= 1.0)),
        "position_within_2px": float(np.mean(errors <= 2.0)),
        "position_mean_error_px": float(np.mean(errors)),
        "frames": len(truths),
        "objects_scored": int(tally["shape"][1]),
        "ambiguous_objects_skipped": skipped,
        "spurious_detections": spurious,
    })
    if blur > 0:
        squared_error = np.mean((seen.astype(np.float64) - frames.astype(np.float64)) ** 2)
        result.update(blur_px=float(blur), blurred_psnr_db=float(10 * np.log10(255.0**2 / squared_error)))
    return result
