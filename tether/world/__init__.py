"""tether.world: a procedural toy world with exact ground truth.

tether cannot download real video models on a fresh install, so it trains a
small one on this world, where forgetting, drift and prompt following are
measurable: every frame comes with what is really in it.

    from tether.world import render_clip, episode
    frames, truths = render_clip("a red striped circle bounces on grass", 80, seed=0)
    ep = episode("reentry-10s", seed=3); frames, truths = ep.render()

The probe CNN that reads frames back lives in `tether.world.probe` (it
imports torch; its names are re-exported here lazily).
"""

from .episodes import SCENARIOS, Episode, episode
from .prompts import describe, format_timeline, parse, parse_timeline, random_prompt, random_scene
from .render import iter_clip, render_background, render_clip
from .scene import FrameTruth, ObjectSpec, ObjectTruth, SceneChange, SceneSpec, Segment
from .vocab import FPS, vocabulary

_PROBE_NAMES = ("Probe", "train_probe", "load_probe", "evaluate_probe")


def __getattr__(name):
    if name in _PROBE_NAMES:
        from . import probe

        return getattr(probe, name)
    raise AttributeError(f"module 'tether.world' has no attribute {name!r}")


__all__ = [
    "FPS", "vocabulary", "ObjectSpec", "SceneSpec", "SceneChange", "Segment", "FrameTruth", "ObjectTruth",
    "render_clip", "iter_clip", "render_background", "describe", "parse", "random_scene", "random_prompt",
    "parse_timeline",
    "format_timeline", "SCENARIOS", "Episode", "episode", *_PROBE_NAMES,
]
