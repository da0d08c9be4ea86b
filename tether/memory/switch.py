"""Switch rules: what happens to the memory when the prompt changes.

A rule is applied at the chunk boundary where a new prompt takes over, after
the new prompt's text K/V are ready (the text cache is per prompt, so a
text-cache reset is implied by every rule). Rules compose with any policy
that can hand out the frames they act on.
"""

from ..errors import TetherError


class SwitchRule:
    name = "base"

    def apply(self, stream, text_ctx, cut: bool = False) -> None:
        raise NotImplementedError


class TextReset(SwitchRule):
    """Only the text conditioning changes; cached K/V keep the old prompt's imprint."""

    name = "text-reset"

    def apply(self, stream, text_ctx, cut: bool = False) -> None:
        pass


SWITCH_RULES = {cls.name: cls for cls in (TextReset,)}


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
