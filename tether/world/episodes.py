"""Long scripted evaluation episodes with a known ground-truth track.

An episode is a timeline (prompts with durations and scene cuts) plus the
exact world it describes, both derived from (scenario name, seed):

    reentry-5s / -10s / -20s / -40s   the subject drifts out of the right edge, stays away exactly
                                      that long, then comes back ("the circle comes back" names only
                                      the shape, so colour, pattern and size must be remembered)
    attribute-switch                  "the circle turns green"
    motion-switch                     "the circle stops", "the circle orbits", ...
    scene-cut                         same subject, new background, scene cut
    story                             six prompts: colour, pattern, size, motion and camera changes and a cut
    long-60s / long-240s              one scene held for a long time (drift and forgetting)

Segment lengths are whole multiples of 0.75 s (one 12-frame generation chunk)
wherever the scenario allows; re-entry gaps are exactly the stated seconds.
"""

from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from tether.errors import TetherError

from .prompts import describe, format_timeline, parse, random_scene
from .render import DRIFT_SPEED, first_pixel_centre, footprint, iter_clip, render_clip, seeded_rng
from .scene import ObjectSpec, SceneChange, SceneSpec, Segment
from .vocab import BACKGROUNDS, CAMERA_PANS, COLOUR_NAMES, FPS, MOTIONS, PATTERNS, SHAPES, SIZES, WORLD_SIZE

REENTRY_EXIT_SECONDS = 3.0  # the subject is visible for this long, then leaves
REENTRY_RETURN_SECONDS = 6.0


@dataclass(frozen=True)
class Episode:
    """A scripted timeline and the world it renders to.

    `segments`: tuple of Segment (prompt, seconds, cut). `facts`: scenario
    facts for evaluation, e.g. {"subject": 0, "exit_frame": 48, "gap_frames": 80}.
    `exit_plan`: (object index, frame, y) for scripts whose subject must leave
    through the right edge exactly at that frame; its start position is
    solved for the render size, since "no pixel left" depends on the pixel grid.
    """

    name: str
    seed: int
    segments: tuple
    facts: dict = field(default_factory=dict)
    exit_plan: Optional[tuple] = None

    @property
    def num_frames(self) -> int:
        return sum(s.frames for s in self.segments)

    @property
    def seconds(self) -> float:
        return self.num_frames / FPS

    def timeline_string(self) -> str:
        """The timeline in inline syntax, e.g. "a red circle bounces on grass[6s] | the circle stops[6s]"."""
        return format_timeline(self.segments)

    def segment_starts(self) -> list:
        """First frame of each segment."""
        starts, frame = [], 0
        for segment in self.segments:
            starts.append(frame)
            frame += segment.frames
        return starts

    def placements(self, size: int = 64) -> dict:
        """Scripted start positions {object index: (x, y)} in world px for a render at `size`."""
        if self.exit_plan is None:
            return {}
        index, frame, y = self.exit_plan
        spec = parse(self.segments[0].prompt).objects[index]
        half_width = footprint(spec.shape, spec.size)[0]
        # Drifting right, the footprint's left edge passes the last pixel centre exactly at `frame`.
        last_pixel_centre = WORLD_SIZE - first_pixel_centre(size / WORLD_SIZE)
        return {index: (last_pixel_centre + half_width - frame * DRIFT_SPEED, y)}

    def render(self, size: int = 64):
        """(frames uint8 [T, size, size, 3], list of FrameTruth); 3840 frames at 64x64 take ~47 MB."""
        return render_clip(list(self.segments), seed=self.seed, size=size, placements=self.placements(size))

    def iter_render(self, size: int = 64, chunk_frames: int = 256):
        """Yields (frames, truths) chunks, for episodes too long to hold at large sizes."""
        return iter_clip(list(self.segments), seed=self.seed, size=size, chunk_frames=chunk_frames,
                         placements=self.placements(size))


def _pick(rng, values, exclude=()):
    choices = [v for v in values if v not in exclude]
    return choices[rng.integers(len(choices))]


def _subject(rng, motions=MOTIONS) -> ObjectSpec:
    return ObjectSpec(_pick(rng, SHAPES), _pick(rng, COLOUR_NAMES), _pick(rng, PATTERNS), _pick(rng, SIZES),
                      _pick(rng, motions))


def _the(spec: ObjectSpec) -> ObjectSpec:
    """How later prompts name the subject: by shape only."""
    return ObjectSpec(shape=spec.shape)


def _reentry(rng, gap_seconds: float):
    subject = _subject(rng, motions=("drift right",))
    scene = SceneSpec(_pick(rng, BACKGROUNDS), (subject,))
    exit_frame = int(REENTRY_EXIT_SECONDS * FPS)
    _, above, below = footprint(subject.shape, subject.size)
    y = float(np.round(rng.uniform(above, WORLD_SIZE - below) * 8) / 8)
    segments = (
        Segment(describe(scene), REENTRY_EXIT_SECONDS),
        Segment(describe(SceneChange(target=_the(subject), motion="away")), gap_seconds),
        Segment(describe(SceneChange(target=_the(subject), motion="return")), REENTRY_RETURN_SECONDS),
    )
    facts = {"subject": 0, "exit_frame": exit_frame, "gap_frames": int(round(gap_seconds * FPS))}
    return segments, facts, (0, exit_frame, y)


def _attribute_switch(rng):
    subject = _subject(rng, motions=("bounce", "orbit", "rest"))
    new_colour = _pick(rng, COLOUR_NAMES, exclude=(subject.colour,))
    segments = (
        Segment(describe(SceneSpec(_pick(rng, BACKGROUNDS), (subject,))), 6.0),
        Segment(describe(SceneChange(target=_the(subject), colour=new_colour)), 6.0),
    )
    return segments, {"subject": 0, "switch_frame": 96, "before": subject.colour, "after": new_colour}, None


def _motion_switch(rng):
    subject = _subject(rng)
    new_motion = _pick(rng, MOTIONS, exclude=(subject.motion,))
    segments = (
        Segment(describe(SceneSpec(_pick(rng, BACKGROUNDS), (subject,))), 6.0),
        Segment(describe(SceneChange(target=_the(subject), motion=new_motion)), 6.0),
    )
    return segments, {"subject": 0, "switch_frame": 96, "before": subject.motion, "after": new_motion}, None


def _scene_cut(rng):
    subject = _subject(rng)
    first = _pick(rng, BACKGROUNDS)
    second = _pick(rng, BACKGROUNDS, exclude=(first,))
    segments = (
        Segment(describe(SceneSpec(first, (subject,))), 6.0),
        Segment(describe(SceneSpec(second, (subject,))), 6.0, True),
    )
    return segments, {"subject": 0, "cut_frame": 96, "before": first, "after": second}, None


def _story(rng):
    subject = _subject(rng, motions=("bounce", "orbit", "rest", "drift left", "drift right"))
    background = _pick(rng, BACKGROUNDS)
    seconds = 4.5
    segments = [Segment(describe(SceneSpec(background, (subject,))), seconds)]
    events = [str(e) for e in rng.permutation(["colour", "pattern", "size", "motion", "camera", "cut"])[:5]]
    pan = 0.0
    for event in events:
        cut = False
        if event == "camera":
            pan = 0.0 if pan else float(_pick(rng, list(CAMERA_PANS.values())))
            change = SceneChange(camera_pan=pan)
        elif event == "cut":
            background = _pick(rng, BACKGROUNDS, exclude=(background,))
            change, cut, pan = SceneSpec(background, (subject,)), True, 0.0
        else:
            pools = {"colour": COLOUR_NAMES, "pattern": PATTERNS, "size": SIZES, "motion": MOTIONS}
            value = _pick(rng, pools[event], exclude=(getattr(subject, event),))
            change = SceneChange(target=_the(subject), **{event: value})
            subject = ObjectSpec(**{**vars(subject), event: value})
        segments.append(Segment(describe(change), seconds, cut))
    return tuple(segments), {"subject": 0, "events": events}, None


def _long(rng, seconds: float):
    scene = random_scene(rng)
    return (Segment(describe(scene), seconds),), {}, None


_SCENARIOS = {
    "reentry-5s": lambda rng: _reentry(rng, 5.0),
    "reentry-10s": lambda rng: _reentry(rng, 10.0),
    "reentry-20s": lambda rng: _reentry(rng, 20.0),
    "reentry-40s": lambda rng: _reentry(rng, 40.0),
    "attribute-switch": _attribute_switch,
    "motion-switch": _motion_switch,
    "scene-cut": _scene_cut,
    "story": _story,
    "long-60s": lambda rng: _long(rng, 60.0),
    "long-240s": lambda rng: _long(rng, 240.0),
}
SCENARIOS = tuple(_SCENARIOS)


def episode(name: str, seed: int = 0) -> Episode:
    """The scripted episode `name` (one of SCENARIOS), fully determined by `seed`."""
    if name not in _SCENARIOS:
        raise TetherError(f"unknown episode scenario {name!r}; known: {', '.join(SCENARIOS)}")
    segments, facts, exit_plan = _SCENARIOS[name](seeded_rng(int(seed), "episode:" + name))
    return Episode(name, int(seed), tuple(segments), facts, exit_plan)
