"""Memory policies, selected by name.

`make_policy("window", window=12)` builds one; `POLICIES` lists them all.
"""

from ..errors import TetherError
from .base import AttentionView, CachedFrame, Layout, MemoryPolicy
from .apr import AsymmetricProximityRecache
from .dual import DualMemory
from .full import FullContext
from .frame_sink import FrameSink
from .infinity_rope import InfinityRope
from .rolling import Rolling
from .slow_fast import SlowFast
from .window import SlidingWindow

POLICIES = {cls.name: cls for cls in (FullContext, SlidingWindow)}
POLICIES.update({cls.name: cls for cls in (FrameSink, InfinityRope, Rolling)})
POLICIES.update({cls.name: cls for cls in (SlowFast, DualMemory)})


def register(cls):
    POLICIES[cls.name] = cls
    return cls


def make_policy(name: str, chunk_frames: int = 3, **options) -> MemoryPolicy:
    if name not in POLICIES:
        raise TetherError(f"unknown policy '{name}' (known: {', '.join(sorted(POLICIES))})")
    try:
        return POLICIES[name](chunk_frames=chunk_frames, **options)
    except TypeError as e:
        raise TetherError(f"bad options for policy '{name}': {e}") from None
