"""Frame sink [LongLive].

The paper's rule: attention covers 12 latent frames, the current chunk
included: a sink of the first 3 latent frames (the first chunk), never
evicted, plus the most recent frames. Positions are absolute: the sink keeps
0-2 and every new frame gets a larger index. The default switch rule is
`kv-recache` (see switch.py).

In tether the current chunk is not in the cache while it is generated, so the
cache holds at most 12 - 3 = 9 frames: the 3 sink frames and the last 6
committed ones. LongLive's own buffer briefly holds 12 (the 3 it is about to
evict stay until the next chunk is written), but no chunk ever attends to them.

Where tether chose, at a recache (`kv-recache`, switch.py):
- The block is what this policy holds (`recache_frames()`: the sink and the
  last 6 frames, 9 <= 12), at their original positions. LongLive re-encodes
  the last 12 generated frames, 6 of which no later chunk attends to, and
  what its sink slots hold afterwards (without `global_sink`) depends on its
  buffer arithmetic; we re-encode the sink with the rest.
- `global_sink=True` is LongLive's inference switch of the same name: the
  sink keeps the K/V it got under the first prompt, across every switch, and
  the re-encoded frames see it as fixed context.
"""

import math

from .base import Layout
from .sink import SinkAndRecent


class FrameSink(SinkAndRecent):
    name = "frame-sink"
    default_switch = "kv-recache"
    positions = (0, math.inf)

    def __init__(self, chunk_frames: int = 3, sink_frames: int = 3, attention_frames: int = 12,
                 global_sink: bool = False):
        self.sink_frames = sink_frames
        self.attention_frames = attention_frames
        self.global_sink = global_sink
        super().__init__(chunk_frames)

    @property
    def recent_frames(self) -> int:
        return self.attention_frames - self.sink_frames - self.chunk_frames

    def layout(self, num_query_frames: int) -> Layout:
        slots = self.sink + self.recent
        return Layout(
            slots=slots,
            key_positions=[f.index for f in slots],
            query_positions=list(range(self.next_index, self.next_index + num_query_frames)),
        )

    def frozen_frames(self) -> list:
        """Frames a recache must leave untouched: the sink, with `global_sink`."""
        return list(self.sink) if self.global_sink else []
