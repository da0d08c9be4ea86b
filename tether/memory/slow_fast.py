"""Slow-fast memory [Context Forcing].

The source's rule. Three parts, 21 latent frames in all: a sink (the first
chunk, never evicted), a slow memory of Nc = 12 frames and a fast memory of
Nl = 6 frames, a FIFO holding the previous and the current chunk. A frame is
consolidated into slow memory when its key is "surprising": the cosine
similarity of its key to the preceding key falls below tau = 0.95. Only the
first latent frame of a chunk can be kept; the slow memory is a FIFO when
full. Bounded positional encoding keeps every temporal index in [0, 20]: sink
at 0-2, the other slots contiguous and ending at 20, the current chunk at
18-20 (the paper's Eq. 8 ranges have typos; this is the intended layout).

Where tether had to choose:

- Clean keys only. The public code decides on, and copies, K/V of the chunk's
  first forward pass, which runs on pure noise. Here the decision and the
  copy both come from the clean commit pass.
- Promotion moves, it does not copy. The decision is made when the chunk is
  committed; the chosen frame goes to slow memory when it leaves the fast
  FIFO, and a frame that leaves unchosen is dropped. So no frame is ever
  attended twice (the code briefly holds a promoted frame in both memories).
- Early chunks. The current chunk sits at its absolute index until that
  would pass 20, then stays at 18-20 (the code's `min(frame, rope_length-1)`
  anchor): distances are exact while the video is shorter than the trained
  window. `pin_queries=True` puts the chunk at 18-20 from the first chunk on.
- `promotion="paper"`: the "key" of a frame is its pre-RoPE keys averaged
  over tokens, per layer, concatenated over layers (RMSNorm before the key
  makes every layer count about equally); "the preceding key" is that of the
  immediately preceding latent frame (the last frame of the previous chunk).
  The test runs on chunks 2, 4, 6, ... (`every=2`), on the chunk's first frame.
- `promotion="code"` (the public code): per layer, the chunk's pre-RoPE keys
  averaged over all its tokens, compared with the previous chunk's average
  (the code compares with the previous forward call, which for the first,
  deciding pass is the previous chunk's commit pass); every chunk is tested;
  nothing before latent frame 6; at most the chunk's first frame. Layers
  decide separately, as in the code: a promoted frame carries the set of
  layers that chose it and is hidden from the others. Two deviations keep the
  memory at 12 frames: the slow FIFO is shared (a frame chosen by any layer
  takes one of the 12 slots, so a layer may see fewer than 12), and a frame
  has one temporal index in every layer (the code packs each layer's slots
  separately, so one frame can sit at different indices in different layers).
- `promotion="uniform"` (ablation): every `every`-th chunk's first frame,
  whatever its content; `every=2` is the code's keyframe interval of 6 frames.
- With a batch, cosine similarities are averaged over it (one memory serves
  the whole batch), as the code does.
"""

import torch
import torch.nn.functional as F

from ..errors import TetherError
from .base import AttentionView, Layout, MemoryPolicy

TRAINED_FRAMES = 21
PROMOTIONS = ("paper", "code", "uniform")


def token_mean_keys(frame) -> torch.Tensor:
    """A frame's pre-RoPE keys averaged over its tokens: [layers, B, heads*head_dim], float32."""
    return frame.k.float().mean(dim=2).flatten(2)


def batch_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity over the last dim, averaged over the batch (dim -2)."""
    return F.cosine_similarity(a, b, dim=-1).mean(dim=-1)


class LayerMaskedView(AttentionView):
    """An attention view in which some slots are hidden from some layers.

    `hidden[layer]` is the set of slot numbers that layer does not attend to;
    the positions of the visible slots are those of the full layout.
    """

    def __init__(self, layout: Layout, rotate, hidden: dict):
        super().__init__(layout, rotate)
        self.hidden = hidden

    def __call__(self, layer: int):
        hidden = self.hidden.get(layer)
        if not hidden:
            return super().__call__(layer)
        if layer not in self._built:
            keep = [i for i in range(len(self.layout.slots)) if i not in hidden]
            visible = Layout([self.layout.slots[i] for i in keep], [self.layout.key_positions[i] for i in keep],
                             self.layout.query_positions)
            self._built[layer] = AttentionView(visible, self.rotate)(layer)
        return self._built[layer]


class SlowFast(MemoryPolicy):
    name = "slow-fast"
    frame_groups = ("sink", "slow", "fast")
    positions = (0, TRAINED_FRAMES - 1)

    def __init__(self, chunk_frames: int = 3, slow_frames: int = 12, fast_frames: int = 6, threshold: float = 0.95,
                 promotion: str = "paper", every: int = 2, first_promotable: int = 6, pin_queries: bool = False):
        if promotion not in PROMOTIONS:
            raise TetherError(f"unknown promotion '{promotion}' for slow-fast (known: {', '.join(PROMOTIONS)})")
        if fast_frames < 2 * chunk_frames:
            raise TetherError(f"slow-fast needs fast_frames >= 2 chunks ({2 * chunk_frames}), got {fast_frames}")
        if slow_frames < 0 or every < 1:
            raise TetherError("slow-fast needs slow_frames >= 0 and every >= 1")
        if chunk_frames + slow_frames + fast_frames > TRAINED_FRAMES:
            raise TetherError(f"slow-fast memory of {chunk_frames}+{slow_frames}+{fast_frames} frames does not fit "
                              f"the {TRAINED_FRAMES} trained positions")
        self.slow_frames = slow_frames
        self.fast_frames = fast_frames
        self.threshold = threshold
        self.promotion = promotion
        self.every = every
        self.first_promotable = first_promotable
        self.pin_queries = pin_queries
        super().__init__(chunk_frames)

    @property
    def max_frames(self) -> int:
        # sink + slow + the fast FIFO less its current chunk, which is the query, not a cached frame
        return self.chunk_frames + self.slow_frames + (self.fast_frames - self.chunk_frames)

    def reset(self):
        super().reset()
        # frames chosen for slow memory (waiting in the fast FIFO or already in slow memory),
        # with the layers that chose them: {latent index: (bool per layer)}
        self.promotions = {}

    # ---- layout ----------------------------------------------------------
    def layout(self, num_query_frames: int) -> Layout:
        top = self.positions[1]
        last = top if self.pin_queries else min(self.next_index + num_query_frames - 1, top)
        first_query = last - num_query_frames + 1
        rest = self.slow + self.fast
        return Layout(
            slots=self.sink + rest,
            key_positions=list(range(len(self.sink))) + list(range(first_query - len(rest), first_query)),
            query_positions=list(range(first_query, last + 1)),
        )

    def view(self, num_query_frames: int, rotate) -> AttentionView:
        layout = self.layout(num_query_frames)
        hidden = {}
        first_slow = len(self.sink)
        for slot, frame in enumerate(self.slow, start=first_slow):
            for layer, chosen in enumerate(self.promotions[frame.index]):
                if not chosen:
                    hidden.setdefault(layer, set()).add(slot)
        return LayerMaskedView(layout, rotate, hidden) if hidden else AttentionView(layout, rotate)

    # ---- committing --------------------------------------------------------
    def commit(self, frames: list) -> None:
        for f in frames:
            f.feature = token_mean_keys(f)
        frames = list(frames)
        while frames and len(self.sink) < self.chunk_frames:
            self.sink.append(frames.pop(0))
        if not frames:
            return
        chosen = self._chosen_layers(frames)
        if chosen is not None:
            self.promotions[frames[0].index] = chosen
        self.fast.extend(frames)
        while len(self.fast) > self.fast_frames - self.chunk_frames:
            leaving = self.fast.pop(0)
            if leaving.index in self.promotions:
                self.slow.append(leaving)
        while len(self.slow) > self.slow_frames:
            del self.promotions[self.slow.pop(0).index]

    def _chosen_layers(self, chunk: list):
        """Which layers promote the chunk's first frame (a tuple of bools), or None."""
        first = chunk[0].index
        num_layers = chunk[0].k.shape[0]
        every_layer = (True,) * num_layers
        if self.promotion in ("paper", "uniform") and (first // self.chunk_frames) % self.every:
            return None
        if self.promotion == "uniform":
            return every_layer
        if self.promotion == "paper":
            preceding = self._cached(first - 1)
            if preceding is None:
                return None
            similarity = batch_cosine(chunk[0].feature.transpose(0, 1).flatten(1),
                                      preceding.feature.transpose(0, 1).flatten(1))
            return every_layer if similarity < self.threshold else None
        if first < self.first_promotable:
            return None
        previous = [self._cached(i) for i in range(first - len(chunk), first)]
        if any(f is None for f in previous):
            return None
        current_mean = torch.stack([f.feature for f in chunk]).mean(dim=0)
        previous_mean = torch.stack([f.feature for f in previous]).mean(dim=0)
        chosen = tuple((batch_cosine(current_mean, previous_mean) < self.threshold).tolist())
        return chosen if any(chosen) else None

    def _cached(self, index: int):
        """The sink or fast frame with this latent index, if still held."""
        for f in self.fast + self.sink:
            if f.index == index:
                return f
        return None

    # ---- resuming ----------------------------------------------------------
    def extra_state(self) -> dict:
        return {"promotions": {index: list(chosen) for index, chosen in self.promotions.items()}}

    def load_extra_state(self, state: dict) -> None:
        self.promotions = {int(index): tuple(chosen) for index, chosen in state["promotions"].items()}
