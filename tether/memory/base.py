"""The memory interface every long-video policy implements.

A policy caches, for a set of committed latent frames ("slots"), every layer's
keys *before RoPE* and values. Before each chunk it decides the layout: which
slots the chunk attends to, in which order, and which temporal RoPE index each
slot and each query frame gets. The model never knows which policy runs.

After a chunk is finished, the generator runs it once more at the context
noise level ("commit pass") and hands the policy that pass's clean K/V; the
policy decides what to keep. Each policy declares the most frames it can ever
hold (`max_frames`) and the range of temporal positions it hands out.
"""

import math
from dataclasses import dataclass, field

import torch


@dataclass
class CachedFrame:
    """One committed latent frame.

    `k`/`v` are [layers, B, tokens, heads, head_dim]; `k` is pre-RoPE.
    `latent` [B, C, h, w] is the clean latent, kept so that switch rules can
    re-encode the frame under a new prompt. `grid` is the token grid (h, w).
    `feature` is free for policies that compare frames (e.g. anchor choice).
    """

    index: int
    latent: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    grid: tuple
    feature: torch.Tensor | None = None

    def replaced(self, k=None, v=None) -> "CachedFrame":
        return CachedFrame(self.index, self.latent, self.k if k is None else k, self.v if v is None else v,
                           self.grid, self.feature)


@dataclass
class Layout:
    """What one chunk attends to: slots in order, their positions, the query frames' positions."""

    slots: list
    key_positions: list
    query_positions: list


class AttentionView:
    """Per-layer rotated keys and values for one layout, built once and reused.

    A chunk takes several forward passes (denoising steps plus the commit
    pass) with the same layout, so keys are rotated once per chunk, not once
    per pass.
    """

    def __init__(self, layout: Layout, rotate):
        self.layout = layout
        self.rotate = rotate
        self._built = {}

    def __call__(self, layer: int):
        if not self.layout.slots:
            return None
        if layer not in self._built:
            slots = self.layout.slots
            h, w = slots[0].grid
            keys = torch.cat([s.k[layer] for s in slots], dim=1)
            values = torch.cat([s.v[layer] for s in slots], dim=1)
            self._built[layer] = (self.rotate(keys, self.layout.key_positions, h, w), values)
        return self._built[layer]


class MemoryPolicy:
    """Base class. Subclasses set `name`, `max_frames`, `positions` and implement `layout` and `commit`.

    `frame_groups` names the list attributes holding CachedFrames, so that
    saving, restoring and counting work for every policy without extra code.
    """

    name = "base"
    frame_groups = ("frames",)
    default_switch = "text-reset"
    #: declared bounds on temporal positions (inclusive); math.inf for absolute positions
    positions = (0, math.inf)

    def __init__(self, chunk_frames: int = 3):
        self.chunk_frames = chunk_frames
        self.reset()

    # ---- what every policy defines -------------------------------------
    @property
    def max_frames(self) -> int:
        raise NotImplementedError

    def reset(self):
        for group in self.frame_groups:
            setattr(self, group, [])
        self.next_index = 0  # absolute latent index of the next frame to be generated

    def layout(self, num_query_frames: int) -> Layout:
        raise NotImplementedError

    def commit(self, frames: list) -> None:
        raise NotImplementedError

    # ---- optional hooks --------------------------------------------------
    def on_scene_cut(self) -> None:
        """A `#` segment starts. Default: nothing (the text switch still happens)."""

    def recache_frames(self) -> list:
        """Frames a KV recache re-encodes under a new prompt (oldest first)."""
        return self.cached_frames()

    def replace_frames(self, new_frames: dict) -> None:
        """Swap frames by absolute index (after a recache)."""
        for group in self.frame_groups:
            setattr(self, group, [new_frames.get(f.index, f) for f in getattr(self, group)])

    def extra_state(self) -> dict:
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass

    # ---- shared machinery ----------------------------------------------
    def cached_frames(self) -> list:
        seen, out = set(), []
        for group in self.frame_groups:
            for f in getattr(self, group):
                if id(f) not in seen:
                    seen.add(id(f))
                    out.append(f)
        return sorted(out, key=lambda f: f.index)

    def num_cached_frames(self) -> int:
        return len(self.cached_frames())

    def view(self, num_query_frames: int, rotate) -> AttentionView:
        return AttentionView(self.layout(num_query_frames), rotate)

    def advance(self, num_frames: int) -> None:
        self.next_index += num_frames

    def state_dict(self) -> dict:
        frames = self.cached_frames()
        position = {id(f): i for i, f in enumerate(frames)}
        return {
            "policy": self.name,
            "next_index": self.next_index,
            "frames": [
                {"index": f.index, "latent": f.latent, "k": f.k, "v": f.v, "grid": list(f.grid), "feature": f.feature}
                for f in frames
            ],
            "groups": {g: [position[id(f)] for f in getattr(self, g)] for g in self.frame_groups},
            "extra": self.extra_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        frames = [
            CachedFrame(d["index"], d["latent"], d["k"], d["v"], tuple(d["grid"]), d.get("feature")) for d in state["frames"]
        ]
        for g in self.frame_groups:
            setattr(self, g, [frames[i] for i in state["groups"][g]])
        self.next_index = state["next_index"]
        self.load_extra_state(state["extra"])
