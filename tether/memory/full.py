"""Full context [CausVid, Self-Forcing].

Every committed frame stays in the cache at its absolute temporal position,
up to the 21 latent frames the models were trained on (cache plus the
current chunk). Past that, Self-Forcing's fixed-size cache rolls: the oldest
frames are evicted, which is what this policy does too.
"""

from .base import Layout, MemoryPolicy

TRAINED_FRAMES = 21


class FullContext(MemoryPolicy):
    name = "full"

    def __init__(self, chunk_frames: int = 3, trained_frames: int = TRAINED_FRAMES):
        self.trained_frames = trained_frames
        super().__init__(chunk_frames)

    @property
    def max_frames(self) -> int:
        return self.trained_frames - self.chunk_frames

    def layout(self, num_query_frames: int) -> Layout:
        return Layout(
            slots=list(self.frames),
            key_positions=[f.index for f in self.frames],
            query_positions=list(range(self.next_index, self.next_index + num_query_frames)),
        )

    def commit(self, frames: list) -> None:
        self.frames = (self.frames + frames)[-self.max_frames:]
