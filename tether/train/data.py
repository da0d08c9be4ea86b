"""Where training batches come from.

Every source draws a batch from a `torch.Generator` the trainer seeds from
the step number, so batches are reproducible across resumes and ranks.

- `synthetic`: random latents and text embeddings of the right shapes, for
  smoke tests at any scale (Wan-scale step time and memory need no data).
- `latents`: a folder of pre-encoded clips (`latents.pt`: normalised latents
  [N, C, F, h, w] and their text embeddings [N, L, D]), such as the toy world's.
  Its `prompts.json`, when present, gives each clip's prompt, for recipes
  that train the text encoder and so cannot use the stored embeddings.
"""

import json
from pathlib import Path

import torch

from ..errors import TetherError


class SyntheticData:
    def __init__(self, channels: int, frames: int, height: int, width: int, text_len: int, text_dim: int):
        self.shape = (channels, frames, height, width)
        self.text_shape = (text_len, text_dim)

    def batch(self, generator: torch.Generator, size: int):
        latents = torch.randn((size, *self.shape), generator=generator)
        text = torch.randn((size, *self.text_shape), generator=generator)
        return latents, text


class LatentData:
    def __init__(self, folder, frames: int | None = None):
        path = Path(folder) / "latents.pt"
        if not path.is_file():
            raise TetherError(f"no encoded dataset at {path}")
        data = torch.load(path, map_location="cpu", weights_only=True)
        self.latents, self.text = data["latents"], data["text"]
        self.frames = frames or self.latents.shape[2]
        prompts_file = Path(folder) / "prompts.json"
        self.prompts = json.loads(prompts_file.read_text())["prompts"] if prompts_file.is_file() else None
        if self.prompts is not None and len(self.prompts) != len(self.latents):
            raise TetherError(f"{prompts_file} has {len(self.prompts)} prompts for {len(self.latents)} clips")
        masks_file = Path(folder) / "masks.pt"  # toy datasets: where the objects are (toy_data.write_object_masks)
        self.masks = torch.load(masks_file, map_location="cpu", weights_only=True)["masks"] if masks_file.is_file() else None
        if self.masks is not None and self.masks.shape != self.latents[:, 0].shape:
            raise TetherError(f"{masks_file} has shape {list(self.masks.shape)}, not the latents' "
                              f"{list(self.latents[:, 0].shape)}: rebuild it (toy_data.write_object_masks)")
        self.folder = Path(folder)

    def batch(self, generator: torch.Generator, size: int, with_prompts: bool = False, with_masks: bool = False):
        """(latents, text embeddings), plus the clips' prompts if `with_prompts`, plus their object
        masks [B, 1, F, h, w] if `with_masks`. Both options draw the same clips from `generator`."""
        index = torch.randint(len(self.latents), (size,), generator=generator)
        start = torch.randint(self.latents.shape[2] - self.frames + 1, (1,), generator=generator).item()
        out = [self.latents[index, :, start:start + self.frames].float(), self.text[index].float()]
        if with_prompts:
            if self.prompts is None:
                raise TetherError("training the text encoder needs the dataset's prompts.json")
            out.append([self.prompts[i] for i in index.tolist()])
        if with_masks:
            if self.masks is None:
                raise TetherError(f"{self.folder} has no masks.pt (object masks): "
                                  f"write them with tether.train.toy_data.write_object_masks('{self.folder}')")
            out.append(self.masks[index, None, start:start + self.frames].float())
        return tuple(out)


def make_data(cfg: dict, model_cfg):
    kind = cfg.get("kind", "synthetic")
    if kind == "synthetic":
        return SyntheticData(model_cfg.in_channels, cfg.get("frames", 21), cfg.get("height", 8), cfg.get("width", 8),
                             model_cfg.text_len, model_cfg.text_dim)
    if kind == "latents":
        return LatentData(cfg["path"], cfg.get("frames"))
    raise TetherError(f"unknown data kind '{kind}' (synthetic, latents)")
