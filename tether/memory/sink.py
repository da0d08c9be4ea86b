"""The shape three baselines share: a sink of the first frames, never evicted, plus a FIFO of recent ones.

LongLive's frame sink, Infinity-RoPE and Rolling Forcing differ in where they
place these frames (their `layout`), not in what they keep, so keeping lives here.
Subclasses set `sink_frames` and define `recent_frames`.
"""

from .base import MemoryPolicy


class SinkAndRecent(MemoryPolicy):
    frame_groups = ("sink", "recent")
    sink_frames = 0

    @property
    def recent_frames(self) -> int:
        raise NotImplementedError

    @property
    def max_frames(self) -> int:
        return self.sink_frames + self.recent_frames

    def commit(self, frames: list) -> None:
        room = self.sink_frames - len(self.sink)
        self.sink = self.sink + frames[:room]
        self.recent = (self.recent + frames[room:])[-self.recent_frames:] if self.recent_frames else []

    def flush_for_switch(self, keep_recent: int) -> None:
        """`kv-flush`: keep the sink and the last `keep_recent` frames."""
        self.recent = self.recent[-keep_recent:] if keep_recent else []
