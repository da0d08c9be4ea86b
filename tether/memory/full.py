"""Full context [CausVid, Self-Forcing].

Every committed frame stays in the cache at its absolute temporal position,
up to the 21 latent frames the models were trained on (cache plus the
current chunk). Past that, Self-Forcing's fixed-size cache rolls: the oldest
frames are evicted. So full context is a sliding window whose width is the
trained length minus one chunk.
"""

from .window import SlidingWindow

TRAINED_FRAMES = 21


class FullContext(SlidingWindow):
    name = "full"

    def __init__(self, chunk_frames: int = 3, trained_frames: int = TRAINED_FRAMES):
        super().__init__(chunk_frames, window=trained_frames - chunk_frames)
