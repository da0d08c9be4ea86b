"""Training clips from the toy world, and the pre-encoded dataset the toy diffusion models learn from.

`sample_clip(seed, index, ...)` is a pure function of its arguments, so the
VAE recipe can draw any clip on any rank without sharing files, and a held-out
set is simply another seed.

`build_latent_dataset` renders clips, encodes them once with the (trained) VAE
and the toy text encoder, and writes the `latents` data source
(`tether.train.data.LatentData`): encoding is by far the slowest part of
feeding the diffusion recipes on CPU, so it is done once, not every step.
"""

import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from ..errors import TetherError
from ..world import random_prompt, render_clip
from ..world.vocab import SIZE_DIAMETERS

# Mixed into every clip's seed so that clip streams never coincide with other users of the same integers.
_CLIP_SALT = 0x70C1
# A prompt leaves each attribute kind out with this probability: the models must learn
# that "a red shape bounces" means some shape, drawn by the world from the clip's seed.
OMIT_PROBABILITY = 0.2
SHARD_SIZE = 50
LATENTS_FILE = "latents.pt"
PROMPTS_FILE = "prompts.json"
MASKS_FILE = "masks.pt"


def sample_clip(seed: int, index: int, num_frames: int = 81, size: int = 64, with_truth: bool = False):
    """Clip `index` of stream `seed`: (uint8 frames [num_frames, size, size, 3], prompt[, FrameTruths]).

    Prompts come from the world's grammar (one or two objects, camera pans,
    left-out attributes); what a prompt leaves out, the renderer fills in from
    the same seed, so the clip always agrees with its prompt.
    """
    prompt, render_seed = _clip_script(seed, index)
    frames, truths = render_clip(prompt, num_frames, seed=render_seed, size=size)
    return (frames, prompt, truths) if with_truth else (frames, prompt)


def clip_truths(seed: int, index: int, num_frames: int = 81, only=None) -> list:
    """The FrameTruths of `sample_clip(seed, index, num_frames)` (of the frames in `only`, if given)."""
    prompt, render_seed = _clip_script(seed, index)
    return render_clip(prompt, num_frames, seed=render_seed, size=64, only=only)[1]


def _clip_script(seed: int, index: int) -> tuple:
    """Clip `index` of stream `seed`: its prompt and the seed its render fills the rest in from."""
    rng = np.random.default_rng([_CLIP_SALT, int(seed), int(index)])
    prompt = random_prompt(rng, omit_probability=OMIT_PROBABILITY)
    return prompt, int(rng.integers(2**31))


def clips_to_video(frames_list) -> torch.Tensor:
    """uint8 clips [T, H, W, 3] (same shape) -> float video batch [B, 3, T, H, W] in [-1, 1]."""
    stacked = torch.from_numpy(np.stack(frames_list))
    return stacked.permute(0, 4, 1, 2, 3).float().div_(127.5).sub_(1.0)


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def build_latent_dataset(folder, codec, text_encoder, num_clips: int, num_frames: int = 81, size: int = 64,
                         seed: int = 0, batch_size: int = 4, progress: bool = True) -> dict:
    """Render, encode and write `num_clips` clips as a `latents` data source in `folder`.

    Clips are encoded in shards of SHARD_SIZE written atomically to
    `folder/shards/`; an interrupted build resumes at the first missing shard.
    The merged `latents.pt` holds fp16 tensors (half the disk, and the
    diffusion recipes cast batches to fp32 anyway). Returns build statistics.
    """
    from tqdm import tqdm

    folder = Path(folder)
    shard_dir = folder / "shards"
    shard_dir.mkdir(parents=True, exist_ok=True)
    num_shards = -(-num_clips // SHARD_SIZE)
    started = time.perf_counter()
    encoded_now = 0
    bar = tqdm(total=num_clips, unit="clip", desc="dataset", disable=not progress)
    for shard in range(num_shards):
        path = shard_dir / f"shard_{shard:05d}.pt"
        indices = range(shard * SHARD_SIZE, min(num_clips, (shard + 1) * SHARD_SIZE))
        if path.exists():
            bar.update(len(indices))
            continue
        latents, texts, prompts = [], [], []
        for first in range(0, len(indices), batch_size):
            batch = [sample_clip(seed, i, num_frames, size) for i in indices[first:first + batch_size]]
            with torch.no_grad():
                latents.append(codec.encode(clips_to_video([f for f, _ in batch])).to(torch.float16).cpu())
                texts.append(text_encoder.encode([p for _, p in batch]).to(torch.float16).cpu())
            prompts += [p for _, p in batch]
            bar.update(len(batch))
            encoded_now += len(batch)
        _atomic_save({"latents": torch.cat(latents), "text": torch.cat(texts), "prompts": prompts,
                      "indices": list(indices)}, path)
    bar.close()
    shards = [torch.load(shard_dir / f"shard_{s:05d}.pt", weights_only=True) for s in range(num_shards)]
    latents = torch.cat([s["latents"] for s in shards])
    if len(latents) != num_clips:
        raise TetherError(f"{shard_dir} holds {len(latents)} clips, not {num_clips}: it was built with other settings")
    _atomic_save({"latents": latents, "text": torch.cat([s["text"] for s in shards])}, folder / LATENTS_FILE)
    prompts = [p for s in shards for p in s["prompts"]]
    meta = {"num_clips": num_clips, "num_frames": num_frames, "size": size, "seed": seed, "prompts": prompts}
    (folder / PROMPTS_FILE).write_text(json.dumps(meta, indent=0) + "\n")
    write_object_masks(folder, codec.temporal_stride, progress=progress, latent_shape=latents.shape[1:])
    seconds = time.perf_counter() - started
    return {"clips": num_clips, "encoded_now": encoded_now, "seconds": seconds,
            "clips_per_second": encoded_now / seconds if encoded_now else None,
            "latent_shape": list(latents.shape[1:])}


def object_mask(truths, latent_frames: int, height: int, width: int, size: int = 64, temporal_stride: int = 4) -> torch.Tensor:
    """Where the clip's objects are, per latent pixel: bool [latent_frames, height, width].

    A latent pixel is marked when the square around any visible object's disc
    (its nominal diameter, centred on it) overlaps that pixel's square in any
    of the frames its latent frame encodes (frame 0 alone, then 4 frames each,
    as Wan's VAE groups them). Positions are in `size`-px frames.
    """
    stride = size / height
    rows = (torch.arange(height, dtype=torch.float32) + 0.5) * stride
    columns = (torch.arange(width, dtype=torch.float32) + 0.5) * (size / width)
    mask = torch.zeros(latent_frames, height, width, dtype=torch.bool)
    for latent in range(latent_frames):
        first = 0 if latent == 0 else 1 + temporal_stride * (latent - 1)
        last = 0 if latent == 0 else first + temporal_stride - 1
        for truth in truths[first:last + 1]:
            for obj in truth.objects:
                if not obj.visible:
                    continue
                reach = SIZE_DIAMETERS[obj.size] / 2 + stride / 2  # disc radius plus half a latent pixel
                near_y = (rows - obj.y).abs() <= reach
                near_x = (columns - obj.x).abs() <= reach
                mask[latent] |= near_y[:, None] & near_x[None, :]
    return mask


def write_object_masks(folder, temporal_stride: int = 4, progress: bool = True, latent_shape=None) -> Path:
    """`masks.pt` beside an encoded dataset: every clip's `object_mask`, from the world's truth (no VAE).

    The clips are re-simulated from prompts.json's seed, so a dataset built
    before masks existed gets them in seconds. `latent_shape` (C, F, h, w)
    spares re-reading latents.pt when the caller has just written it.
    """
    from tqdm import tqdm

    folder = Path(folder)
    meta = json.loads((folder / PROMPTS_FILE).read_text())
    if latent_shape is None:
        latent_shape = torch.load(folder / LATENTS_FILE, map_location="cpu", weights_only=True)["latents"].shape[1:]
    _, latent_frames, height, width = latent_shape
    masks = [object_mask(clip_truths(meta["seed"], index, meta["num_frames"]), latent_frames, height, width,
                         64, temporal_stride)  # clip_truths places objects in a 64-px frame
             for index in tqdm(range(meta["num_clips"]), desc="object masks", unit="clip", disable=not progress)]
    path = folder / MASKS_FILE
    _atomic_save({"masks": torch.stack(masks)}, path)
    return path
