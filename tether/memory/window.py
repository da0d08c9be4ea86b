"""Sliding window [Self-Forcing's local attention].

The last W committed frames at their absolute temporal positions; nothing
older is remembered. The baseline every other policy is measured against.
"""

from .base import Layout, MemoryPolicy


class SlidingWindow(MemoryPolicy):
    name = "window"

    def __init__(self, chunk_frames: int = 3, window: int = 9):
        self.window = window
        super().__init__(chunk_frames)

    @property
    def max_frames(self) -> int:
        return self.window

    def layout(self, num_query_frames: int) -> Layout:
        return Layout(
            slots=list(self.frames),
            key_positions=[f.index for f in self.frames],
            query_positions=list(range(self.next_index, self.next_index + num_query_frames)),
        )

    def commit(self, frames: list) -> None:
        self.frames = (self.frames + frames)[-self.window:]
