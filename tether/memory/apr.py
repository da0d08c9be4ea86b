"""Asymmetric Proximity Recache, the `apr` switch rule [Grounded Forcing].

The source's rule. At a prompt switch, recompute the K/V of the cached local
frames under the new prompt (as LongLive's recache does), then blend each
frame's old and new K/V: K' = (1 - a_t) K_old + a_t K_new, the same for V,
with a_t = min(a_max, 1 - d_t / D), a_max = 0.8, d_t the frame's distance
from the generation frontier and D the recache window. Frames near the
frontier take most of the new prompt, far ones keep the old: the switch is
felt at once without a semantic shock. Anchors are not recached.

Where tether had to choose:

- Distance: the frontier is the index of the next frame to generate, and
  d_t = frontier - 1 - t, so the newest cached frame has d = 0. With D = 6
  the LTM's six frames get 0.8, 0.8, 2/3, 1/2, 1/3, 1/6.
- D: `window=`, by default the policy's `recache_window` (dual: the LTM span,
  6), else the number of recached frames. a_t is clamped at 0, so frames
  farther than D keep their old K/V (they still take part in the block).
- The re-encoding is `kv-recache` itself (LongLive's recache): the frames
  the policy exposes (`recache_frames()`, less its `frozen_frames()`) run at
  t = 0 under the new prompt as one bidirectional block, each at the position
  the next chunk sees it at, with the policy's other slots (dual: the anchors)
  as fixed context. APR then pulls each frame back towards its old K/V, so
  a_max = 1 with D = inf is plain recache, and any policy that works with
  `kv-recache` works with `apr`.
"""

from ..errors import TetherError
from .switch import KVRecache, SwitchRule, register_switch


def blend(old, new, alpha: float):
    return ((1 - alpha) * old.float() + alpha * new.float()).to(old.dtype)


@register_switch
class AsymmetricProximityRecache(SwitchRule):
    name = "apr"

    def __init__(self, alpha_max: float = 0.8, window: float | None = None):
        if not 0 <= alpha_max <= 1:
            raise TetherError(f"apr alpha_max must be in [0, 1], got {alpha_max}")
        if window is not None and not window > 0:
            raise TetherError(f"apr window must be positive, got {window}")
        self.alpha_max = alpha_max
        self.window = window

    def weight(self, distance: int, window: float) -> float:
        """a_t for a frame `distance` latent frames behind the newest one."""
        return min(self.alpha_max, max(0.0, 1 - distance / window))

    def apply(self, stream, text_ctx, cut: bool = False) -> None:
        policy = stream.policy
        before = {f.index: f for f in policy.recache_frames()}
        if not before:
            return
        KVRecache(max_frames=len(before)).apply(stream, text_ctx)
        window = self.window or getattr(policy, "recache_window", len(before))
        newest = policy.next_index - 1
        blended = {}
        for after in policy.recache_frames():
            old = before.get(after.index)
            if old is None or after is old:  # frozen frames were not re-encoded
                continue
            alpha = self.weight(newest - after.index, window)
            blended[after.index] = after.replaced(k=blend(old.k, after.k, alpha), v=blend(old.v, after.v, alpha))
        policy.replace_frames(blended)


APR = AsymmetricProximityRecache
