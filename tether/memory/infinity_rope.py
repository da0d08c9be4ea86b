"""Infinity-RoPE [Infinity-RoPE], training-free.

The paper's rule: a sink of 1 latent frame plus a window of 6, keys cached
without RoPE. Every forward re-indexes the window 0..5, the F query frames
taking 6-F..5, and the sink sits at 0, so no position ever exceeds 5 however
long the video. At a prompt switch, `kv-flush` keeps the sink and the last 2
frames. RoPE cut: the first chunk of a segment marked `#` is placed at 45-47,
far from everything cached, which forces a hard scene cut.

Where tether chose:
- The window of 6 counts the current chunk (its queries hold 6-F..5, the
  cached window frames the positions just below), so the cache holds at most
  1 + 6 - 3 = 4 frames: the sink and the last 3 committed frames. The sink is
  the first latent frame (with a larger sink, its frames take 0, 1, ...); a
  window frame may share position 0 with it.
- The first chunk too has its queries at 3..5 (the rule is the same for every
  forward; there is nothing cached to be near).
- The RoPE cut is the one place positions leave [0, 5]. It is declared in
  `deliberate_positions` (queries of the cut chunk only, at 45..45+F-1) so an
  invariant check can allow exactly that. It applies to all forwards of that
  chunk, the commit pass included; later chunks see its frames re-indexed as usual.
"""

from .base import Layout
from .sink import SinkAndRecent


class InfinityRope(SinkAndRecent):
    name = "infinity-rope"
    default_switch = "kv-flush"
    positions = (0, 5)

    def __init__(self, chunk_frames: int = 3, sink_frames: int = 1, window: int = 6, cut_position: int = 45):
        self.sink_frames = sink_frames
        self.window = window
        self.cut_position = cut_position
        self.positions = (0, window - 1)
        self.deliberate_positions = tuple(range(cut_position, cut_position + chunk_frames))
        super().__init__(chunk_frames)

    def reset(self):
        super().reset()
        self.cut_pending = False

    @property
    def recent_frames(self) -> int:
        return self.window - self.chunk_frames

    def layout(self, num_query_frames: int) -> Layout:
        first_query = self.window - num_query_frames
        recent = self.recent[-first_query:] if first_query > 0 else []
        if self.cut_pending:
            queries = range(self.cut_position, self.cut_position + num_query_frames)
        else:
            queries = range(first_query, self.window)
        return Layout(
            slots=self.sink + recent,
            key_positions=list(range(len(self.sink))) + list(range(first_query - len(recent), first_query)),
            query_positions=list(queries),
        )

    def commit(self, frames: list) -> None:
        super().commit(frames)
        self.cut_pending = False

    def on_scene_cut(self) -> None:
        self.cut_pending = True

    def extra_state(self) -> dict:
        return {"cut_pending": self.cut_pending}

    def load_extra_state(self, state: dict) -> None:
        self.cut_pending = state.get("cut_pending", False)
