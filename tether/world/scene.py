"""What a toy-world clip shows: scene specs going in, per-frame ground truth coming out.

A spec attribute set to None means "not stated": the renderer picks it from
the seed (first time an object appears) or keeps the current value (later
segments), and the ground truth records which it was.
"""

from dataclasses import dataclass
from typing import NamedTuple, Optional

from tether.errors import TetherError

from .vocab import ATTRIBUTE_VALUES, BACKGROUNDS, FPS, OBJECT_ATTRIBUTES


def _check_value(kind: str, value, allowed) -> None:
    if value is not None and value not in allowed:
        raise TetherError(f"unknown {kind} {value!r}; known: {', '.join(allowed)}")


@dataclass(frozen=True)
class ObjectSpec:
    """One object: shape, colour, pattern, size and motion (each may be None = unstated)."""

    shape: Optional[str] = None
    colour: Optional[str] = None
    pattern: Optional[str] = None
    size: Optional[str] = None
    motion: Optional[str] = None

    def __post_init__(self):
        for name in OBJECT_ATTRIBUTES:
            _check_value(name, getattr(self, name), ATTRIBUTE_VALUES[name])

    def stated(self) -> frozenset:
        """Names of the attributes this spec fixes."""
        return frozenset(name for name in OBJECT_ATTRIBUTES if getattr(self, name) is not None)

    def is_complete(self) -> bool:
        return len(self.stated()) == len(OBJECT_ATTRIBUTES)


@dataclass(frozen=True)
class SceneSpec:
    """A shot: background, one or two objects, and the camera pan speed.

    `camera_pan` is in world pixels per frame (64-px frame); positive moves the
    view to the right, so the background texture scrolls left.
    """

    background: Optional[str] = None
    objects: tuple = ()
    camera_pan: float = 0.0

    def __post_init__(self):
        object.__setattr__(self, "objects", tuple(self.objects))
        _check_value("background", self.background, BACKGROUNDS)
        if not 1 <= len(self.objects) <= 2:
            raise TetherError(f"a scene holds one or two objects, got {len(self.objects)}")
        if not all(isinstance(o, ObjectSpec) for o in self.objects):
            raise TetherError("scene objects must be ObjectSpec instances")


@dataclass(frozen=True)
class SceneChange:
    """One timeline sentence that changes the running scene ("the circle turns green").

    `target` names the object (a partial spec matched against the scene's
    objects); it is None for a camera change. Exactly one change is set.
    """

    target: Optional[ObjectSpec] = None
    shape: Optional[str] = None
    colour: Optional[str] = None
    pattern: Optional[str] = None
    size: Optional[str] = None
    motion: Optional[str] = None
    camera_pan: Optional[float] = None

    def __post_init__(self):
        for name in OBJECT_ATTRIBUTES:
            _check_value(name, getattr(self, name), ATTRIBUTE_VALUES[name])
        if len(self.changes()) != 1:
            raise TetherError(f"a scene change sets exactly one thing, got {sorted(self.changes()) or 'nothing'}")
        if (self.camera_pan is None) == (self.target is None):
            raise TetherError("a scene change names an object, unless it moves the camera")

    def changes(self) -> dict:
        """{attribute name: new value} for what this sentence changes."""
        names = OBJECT_ATTRIBUTES + ("camera_pan",)
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}


class Segment(NamedTuple):
    """One timeline segment: a prompt held for `seconds`, `cut` = a scene cut at its start."""

    prompt: str
    seconds: float
    cut: bool = False

    @property
    def frames(self) -> int:
        return int(round(self.seconds * FPS))


@dataclass(frozen=True)
class ObjectTruth:
    """One object in one frame, as actually rendered.

    `x`, `y`: centre in pixels of the rendered frame (may lie outside it).
    `visible`: the object's footprint overlaps the frame; when False not one of
    its pixels is drawn. `visible_fraction`: share of the object's full area
    that is drawn (frame edges and occlusion by later objects removed).
    `stated`: attributes named by the prompt of the current segment.
    `sampled`: attributes no prompt so far has named, picked from the seed.
    `id`: the object's index in the scene; it is also the draw order (higher on top).
    """

    id: int
    shape: str
    colour: str
    pattern: str
    size: str
    motion: str
    x: float
    y: float
    visible: bool
    visible_fraction: float
    stated: frozenset
    sampled: frozenset

    @property
    def spec(self) -> ObjectSpec:
        return ObjectSpec(self.shape, self.colour, self.pattern, self.size, self.motion)


@dataclass(frozen=True)
class FrameTruth:
    """Ground truth of one rendered frame.

    `camera_offset`: horizontal camera position in pixels (the background
    texture is sampled at x + camera_offset). `segment`: index of the timeline
    segment (0 for a single scene). `objects`: in scene order, see ObjectTruth.
    """

    index: int
    segment: int
    background: str
    camera_offset: float
    objects: tuple

    def visible_objects(self) -> tuple:
        return tuple(o for o in self.objects if o.visible)
