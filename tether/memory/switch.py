"""Switch rules: what happens to the memory when the prompt changes.

A rule is applied at the chunk boundary where a new prompt takes over, after
the new prompt's text K/V are ready (the text cache is per prompt, so a
text-cache reset is implied by every rule). Rules compose with any policy
that can hand out the frames they act on.
"""

from ..errors import TetherError
from .base import AttentionView, Layout


class SwitchRule:
    name = "base"

    def check(self, policy) -> None:
        """Raise a TetherError when this rule cannot work with `policy` (called when a stream is built)."""

    def apply(self, stream, text_ctx, cut: bool = False) -> None:
        raise NotImplementedError


class TextReset(SwitchRule):
    """Only the text conditioning changes; cached K/V keep the old prompt's imprint."""

    name = "text-reset"

    def apply(self, stream, text_ctx, cut: bool = False) -> None:
        pass


class KVRecache(SwitchRule):
    """[LongLive] Re-encode the recent memory under the new prompt.

    The last min(12, generated) frames the policy exposes (`recache_frames()`)
    are run again at t=0 under the new prompt, each at the temporal position
    the next chunk sees it at (for absolute policies: its original index), and
    their K/V replace the old ones. Frames the policy freezes
    (`frozen_frames()`, e.g. frame-sink's `global_sink`) and cached frames
    older than the block keep their K/V and act as fixed context, as in
    LongLive where the block is written into a cache that still holds them.

    SPEC §3 calls the block bidirectional; LongLive's code builds a block-wise
    causal mask for it, and so does tether (`Stream.reencode`): chunk i of the
    block sees the context and chunks <= i. With that, recaching under the
    same prompt, before anything was evicted, leaves the cache unchanged.
    """

    name = "kv-recache"

    def __init__(self, max_frames: int = 12):
        self.max_frames = max_frames

    def apply(self, stream, text_ctx, cut: bool = False) -> None:
        policy = stream.policy
        frozen = {id(f) for f in getattr(policy, "frozen_frames", list)()}
        block = [f for f in policy.recache_frames()[-self.max_frames:] if id(f) not in frozen]
        if not block:
            return
        layout = policy.layout(policy.chunk_frames)
        seen_at = {id(s): p for s, p in zip(layout.slots, layout.key_positions)}
        block_positions = [seen_at.get(id(f), f.index) for f in block]
        in_block = {id(f) for f in block}
        context = [s for s in layout.slots if id(s) not in in_block]
        past = None
        if context:
            past = AttentionView(Layout(context, [seen_at[id(s)] for s in context], block_positions),
                                 stream.model.rotate_keys)
        fresh = stream.reencode(block, block_positions, text_ctx, past=past)
        policy.replace_frames({f.index: f for f in fresh})


class KVFlush(SwitchRule):
    """[Infinity-RoPE] Keep the sink and the last 2 frames, drop the rest of the memory.

    The policy does the dropping (`flush_for_switch(keep_recent)`), since only
    it knows which frames are its sink; policies without a sink refuse the rule.
    """

    name = "kv-flush"
    keep_recent = 2

    def check(self, policy) -> None:
        if not hasattr(policy, "flush_for_switch"):
            raise TetherError(f"switch rule 'kv-flush' needs a policy with a sink to keep "
                              f"(frame-sink, infinity-rope, rolling), not '{policy.name}'")

    def apply(self, stream, text_ctx, cut: bool = False) -> None:
        self.check(stream.policy)
        stream.policy.flush_for_switch(self.keep_recent)


SWITCH_RULES = {cls.name: cls for cls in (TextReset, KVRecache, KVFlush)}


def register_switch(cls):
    SWITCH_RULES[cls.name] = cls
    return cls


def make_switch_rule(spec) -> SwitchRule:
    """A rule from its name (`"kv-recache"`) or an already built rule."""
    if isinstance(spec, SwitchRule):
        return spec
    if spec not in SWITCH_RULES:
        raise TetherError(f"unknown switch rule '{spec}' (known: {', '.join(sorted(SWITCH_RULES))})")
    return SWITCH_RULES[spec]()
