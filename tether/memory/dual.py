"""Dual memory [Grounded Forcing].

The source's rule. A Global Consistency Memory (GCM) of K = 3 anchor frames,
never evicted by age, and a Local Temporal Memory (LTM) of the last 6 latent
frames, a FIFO. Anchors are kept diverse: for each new frame z_t, novelty
Z = 1 - max over anchors of cos(z_t, z); redundancy of anchor i
R(z_i) = max over j != i of cos(z_i, z_j); the most redundant anchor is
replaced by z_t when Z > R(target). Dual-Reference RoPE: anchors always at
temporal index 0 (time-invariant); the LTM and the current chunk at
contiguous indices inside the trained range [0, 20]; keys cached before RoPE.
At a prompt switch the LTM is re-encoded and blended (APR, `apr.py`); a
scene cut flushes the LTM and keeps the GCM.

Where tether had to choose (the paper publishes no code):

- LTM unit: latent frames, not chunks. The current chunk is the query, not
  part of the 6.
- Filling and cadence: the GCM takes the first K committed frames (the first
  chunk); from the next chunk on the update runs once per committed chunk.
  Its candidate is the chunk's most novel frame (largest Z): the rule is
  stated per frame, and the most novel frame is the one that can win.
- Ties: the closest pair of anchors always shares the largest R. Of the two,
  the one more similar to all other anchors (larger sum of similarities) is
  replaced, which keeps the spread; a remaining tie replaces the earlier slot.
- Features (`anchor_feature`): `"latent"` (the source: the clean latent,
  flattened) or `"pooled_keys"` (pre-RoPE keys averaged over tokens, then
  over layers). With a batch, cosines are averaged over it.
- Positions: the LTM and the current chunk end at 20, so anchors sit 12-20
  frames before the queries, as the first frames of a 21-frame training clip
  sit before its last chunk: the anchor reads as "the distant start of the
  video", never as the frame just before the LTM (which starting the LTM at
  1 would imply). While the video is shorter than 21 frames the chunk sits at
  its absolute index (distances exact).
- An anchor that is still in the LTM is attended once, in its LTM slot at
  its true distance; it joins the anchors at index 0 when it leaves the LTM.
  Anchors are never recached: after APR, an anchor keeps its committed K/V
  while the LTM holds the blended copy of the same frame.
"""

import torch
import torch.nn.functional as F

from ..errors import TetherError
from .base import Layout, MemoryPolicy

TRAINED_FRAMES = 21
ANCHOR_FEATURES = ("latent", "pooled_keys")


def cosine_matrix(features: list) -> list:
    """Cosine similarities [N][N] (Python floats) of N features [B, D], averaged over the batch."""
    x = F.normalize(torch.stack(features), dim=-1)
    return (torch.einsum("nbd,mbd->nm", x, x) / x.shape[1]).tolist()


class DualMemory(MemoryPolicy):
    name = "dual"
    frame_groups = ("anchors", "local")
    default_switch = "apr"
    positions = (0, TRAINED_FRAMES - 1)

    def __init__(self, chunk_frames: int = 3, anchors: int = 3, local_frames: int = 6,
                 anchor_feature: str = "latent"):
        if anchor_feature not in ANCHOR_FEATURES:
            raise TetherError(f"unknown anchor_feature '{anchor_feature}' (known: {', '.join(ANCHOR_FEATURES)})")
        if anchors < 2 or local_frames < 1:
            raise TetherError("dual memory needs at least 2 anchors and 1 local frame")
        if 1 + local_frames + chunk_frames > TRAINED_FRAMES:
            raise TetherError(f"dual memory of {local_frames} local frames does not fit the {TRAINED_FRAMES} "
                              f"trained positions")
        self.num_anchors = anchors
        self.local_frames = local_frames
        self.anchor_feature = anchor_feature
        super().__init__(chunk_frames)

    @property
    def max_frames(self) -> int:
        return self.num_anchors + self.local_frames

    @property
    def recache_window(self) -> int:
        """APR's default D: the LTM span."""
        return self.local_frames

    # ---- layout ----------------------------------------------------------
    def layout(self, num_query_frames: int) -> Layout:
        top = self.positions[1]
        last = min(self.next_index + num_query_frames - 1, top)
        first_query = last - num_query_frames + 1
        in_local = {f.index for f in self.local}
        anchors = [a for a in self.anchors if a.index not in in_local]
        return Layout(
            slots=anchors + self.local,
            key_positions=[0] * len(anchors) + list(range(first_query - len(self.local), first_query)),
            query_positions=list(range(first_query, last + 1)),
        )

    # ---- committing --------------------------------------------------------
    def feature(self, frame) -> torch.Tensor:
        """The vector anchors are compared by: [B, D], float32."""
        if self.anchor_feature == "latent":
            return frame.latent.float().flatten(1)
        return frame.k.float().mean(dim=2).mean(dim=0).flatten(1)

    def commit(self, frames: list) -> None:
        for f in frames:
            f.feature = self.feature(f)
        self.local = (self.local + list(frames))[-self.local_frames:]
        if len(self.anchors) < self.num_anchors:
            self.anchors = self.anchors + list(frames[: self.num_anchors - len(self.anchors)])
            return
        self.update_anchors(frames)

    def update_anchors(self, candidates: list) -> None:
        count = len(self.anchors)
        similarity = cosine_matrix([f.feature for f in self.anchors + candidates])

        def between(i, j):  # symmetrised, so the closest pair of anchors ties exactly
            return (similarity[i][j] + similarity[j][i]) / 2

        novelty = [1 - max(row[:count]) for row in similarity[count:]]
        best = max(range(len(candidates)), key=novelty.__getitem__)
        others = [[j for j in range(count) if j != i] for i in range(count)]
        redundancy = [max(between(i, j) for j in others[i]) for i in range(count)]
        spread = [sum(between(i, j) for j in others[i]) for i in range(count)]
        # largest redundancy, then the one closer to all the others, then the earlier slot
        target = max(range(count), key=lambda i: (redundancy[i], spread[i]))
        if novelty[best] > redundancy[target]:
            self.anchors = self.anchors[:target] + [candidates[best]] + self.anchors[target + 1:]

    # ---- hooks -------------------------------------------------------------
    def on_scene_cut(self) -> None:
        self.local = []

    def recache_frames(self) -> list:
        return list(self.local)

    def replace_frames(self, new_frames: dict) -> None:
        # anchors keep their committed K/V: only the LTM takes recached frames
        self.local = [new_frames.get(f.index, f) for f in self.local]
