"""The toy-world renderer: scene specs or timelines in, uint8 frames and exact ground truth out.

Two stages. `_simulate` steps every object's motion frame by frame in world
pixels (a 64x64 frame, see vocab.WORLD_SIZE), in plain Python floats, so
trajectories are identical at every render size. `_draw` then renders runs of
frames at once with numpy: a scrolling background tile plus anti-aliased
shapes computed from signed distances.

Everything random comes from `numpy.random.default_rng([seed, purpose, ...])`,
so what an object looks like never depends on how many frames are rendered.
"""

import math
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple, Optional

import numpy as np

from tether.errors import TetherError

from .prompts import parse, parse_timeline
from .scene import FrameTruth, ObjectSpec, ObjectTruth, SceneChange, SceneSpec, Segment
from .vocab import (
    BACKGROUNDS, COLOUR_NAMES, COLOURS, MOTIONS, OBJECT_ATTRIBUTES, PATTERNS, SHAPES, SIZE_DIAMETERS, SIZES,
    WORLD_SIZE,
)

# Motion constants, world pixels per frame. Peak speeds stay within ~0.5-2 px
# per frame so that a small video model can learn the motion.
DRIFT_SPEED = 0.75  # dyadic, so re-entry timing is exact in floating point
BOUNCE_SIDE_SPEED = 0.5
BOUNCE_PEAK_SPEED = 1.875  # vertical speed at the floor; also caps falls from high up
BOUNCE_HEIGHTS = (12.0, 24.0)
ORBIT_RADIUS = 10.0
ORBIT_SPEED = 0.875
REST_DAMPING = 0.6  # per-frame velocity factor: a switch to rest slows down instead of freezing
WRAP_GAP = 4.0  # world px a wrapping drifter spends fully off-frame (about 5 frames)

BACKGROUND_TILE_WIDTH = 4 * WORLD_SIZE  # the background repeats every 256 world px of camera travel
OUTLINE_RGB = np.array([22.0, 22.0, 24.0], dtype=np.float32)
# Surface patterns, in world px: stripe period, dot spacing, and dot radius (dense enough that a
# small star still shows several dots). `pattern_scale` renders them coarser, for experiments.
STRIPE_PERIOD, DOT_PERIOD, DOT_RADIUS = 5.0, 4.0, 1.0
_pattern_scale = [1.0]

# Half width of each shape in units of the nominal radius (half of
# SIZE_DIAMETERS), chosen so that all shapes look about equally big.
_HALF_WIDTHS = {"circle": 1.0, "square": 0.9, "triangle": 1.04, "diamond": 1.15, "star": 1.19}
_STAR_INNER_RATIO = 0.4
_SIN_72 = math.sin(math.radians(72))


def _round_up_eighth(value: float) -> float:
    return math.ceil(value * 8) / 8


@lru_cache(maxsize=None)
def footprint(shape: str, size: str) -> tuple:
    """(half width, extent above, extent below) of an object's footprint box in world px.

    The shape touches the box's sides exactly, and drawing is clipped to the
    box (which trims only the outermost anti-aliasing fringe). The half width
    is a multiple of 1/8 so that drift timing is exact in floating point.
    Triangles and stars point up: their centre is the centre of their circumcircle.
    """
    half_width = _round_up_eighth(_HALF_WIDTHS[shape] * SIZE_DIAMETERS[size] / 2)
    if shape == "triangle":
        circumradius = half_width / math.cos(math.radians(30))
        return half_width, circumradius, circumradius / 2
    if shape == "star":
        circumradius = half_width / _SIN_72
        return half_width, circumradius, circumradius * math.cos(math.radians(36))
    return half_width, half_width, half_width


def first_pixel_centre(scale: float) -> float:
    """World coordinate of the first pixel centre of a frame rendered at `scale` (= size / 64)."""
    return 0.5 / scale


def footprint_in_frame(shape: str, size: str, x: float, y: float, scale: float) -> bool:
    """Whether some pixel centre of the frame lies inside the object's footprint box.

    This is the ground truth's `visible`: when False, not one pixel of the
    object is drawn; when True, the pixels at its outermost point are.
    """
    half_width, above, below = footprint(shape, size)
    near, far = first_pixel_centre(scale), WORLD_SIZE - first_pixel_centre(scale)
    return x + half_width > near and x - half_width < far and y + below > near and y - above < far


def seeded_rng(seed: int, purpose: str, *keys: int) -> np.random.Generator:
    """An independent random stream per (seed, purpose, keys): draws for one purpose never shift another's."""
    if int(seed) != seed or seed < 0:
        raise TetherError(f"seeds are non-negative integers, got {seed!r}")
    return np.random.default_rng([int(seed), zlib.crc32(purpose.encode()), *keys])


# ============================================================================ simulation


@dataclass
class _Actor:
    """One object's changing state during simulation (world px, world px/frame)."""

    id: int
    attrs: dict
    never_stated: frozenset
    rng: np.random.Generator
    stated_now: frozenset = frozenset()
    x: float = 0.0
    y: float = 0.0
    vx: float = 0.0
    vy: float = 0.0
    program: str = "rest"  # what the dynamics run; differs from attrs["motion"] once "return" has arrived
    gravity: float = 0.0
    anchor: tuple = (0.0, 0.0)
    angle: float = 0.0
    angular_speed: float = 0.0
    target_x: float = 0.0
    last_visible: Optional[tuple] = None

    @property
    def footprint(self) -> tuple:
        return footprint(self.attrs["shape"], self.attrs["size"])

    def visible(self, scale: float) -> bool:
        return footprint_in_frame(self.attrs["shape"], self.attrs["size"], self.x, self.y, scale)


class _ActorFrame(NamedTuple):
    id: int
    look: tuple  # (shape, colour, pattern, size): what drawing needs
    motion: str
    x: float
    y: float
    visible: bool
    stated: frozenset
    sampled: frozenset


class _WorldFrame(NamedTuple):
    segment: int
    background: str
    camera_offset: float  # world px
    actors: tuple


def _start_motion(actor: _Actor, motion: str) -> None:
    """Switch an actor's dynamics to `motion`, keeping its position (and, where it makes sense, its heading)."""
    actor.program = motion
    rng = actor.rng
    if motion == "bounce":
        heading = math.copysign(1.0, actor.vx) if abs(actor.vx) > 1e-6 else (1.0 if rng.random() < 0.5 else -1.0)
        actor.vx = heading * BOUNCE_SIDE_SPEED
        height = float(rng.uniform(*BOUNCE_HEIGHTS))
        actor.gravity = BOUNCE_PEAK_SPEED**2 / (2 * height)
    elif motion in ("drift left", "drift right"):
        actor.vx = DRIFT_SPEED if motion == "drift right" else -DRIFT_SPEED
        actor.vy = 0.0
    elif motion == "orbit":
        centre = WORLD_SIZE / 2
        dx, dy = centre - actor.x, centre - actor.y
        length = math.hypot(dx, dy)
        if length < 1e-6:
            theta = float(rng.uniform(0, 2 * math.pi))
            dx, dy, length = math.cos(theta), math.sin(theta), 1.0
        # The anchor sits towards the frame centre, so the orbit swings inwards.
        actor.anchor = (actor.x + ORBIT_RADIUS * dx / length, actor.y + ORBIT_RADIUS * dy / length)
        actor.angle = math.atan2(actor.y - actor.anchor[1], actor.x - actor.anchor[0])
        actor.angular_speed = (1 if rng.random() < 0.5 else -1) * ORBIT_SPEED / ORBIT_RADIUS
    elif motion == "away":
        if abs(actor.vx) > 1e-6:
            heading = math.copysign(1.0, actor.vx)
        else:
            heading = -1.0 if actor.x < WORLD_SIZE / 2 else 1.0
        actor.vx, actor.vy = heading * DRIFT_SPEED, 0.0
    elif motion == "return":
        # Re-enter where it left: the first frame shows the last visible position.
        if actor.last_visible is not None:
            actor.x, actor.y = actor.last_visible
        actor.target_x = WORLD_SIZE / 2
        heading = 1.0 if actor.target_x > actor.x else -1.0
        actor.vx, actor.vy = heading * DRIFT_SPEED, 0.0


def _step(actor: _Actor) -> None:
    """Advance one frame."""
    program = actor.program
    half_width, above, below = actor.footprint
    if program == "bounce":
        floor = WORLD_SIZE - below
        actor.vy = min(actor.vy + actor.gravity, BOUNCE_PEAK_SPEED)
        actor.y += actor.vy
        if actor.y > floor:
            actor.y = 2 * floor - actor.y
            actor.vy = -BOUNCE_PEAK_SPEED
        actor.x += actor.vx
        left, right = half_width, WORLD_SIZE - half_width
        if actor.x < left:
            actor.x, actor.vx = 2 * left - actor.x, abs(actor.vx)
        elif actor.x > right:
            actor.x, actor.vx = 2 * right - actor.x, -abs(actor.vx)
    elif program in ("drift left", "drift right"):
        # The frame is a loop: leave one side, come back on the other after WRAP_GAP.
        start = -half_width - WRAP_GAP / 2
        loop = WORLD_SIZE + 2 * half_width + WRAP_GAP
        actor.x = start + (actor.x + actor.vx - start) % loop
    elif program == "orbit":
        actor.angle += actor.angular_speed
        actor.x = actor.anchor[0] + ORBIT_RADIUS * math.cos(actor.angle)
        actor.y = actor.anchor[1] + ORBIT_RADIUS * math.sin(actor.angle)
    elif program == "away":
        # Keep going until well clear of the frame, then wait there.
        if -3 * half_width < actor.x < WORLD_SIZE + 3 * half_width:
            actor.x += actor.vx
    elif program == "return":
        if abs(actor.target_x - actor.x) <= DRIFT_SPEED:
            actor.x, actor.program = actor.target_x, "rest"
            actor.vx = 0.0
        else:
            actor.x += actor.vx
    else:  # rest
        actor.vx *= REST_DAMPING
        actor.vy *= REST_DAMPING
        actor.x += actor.vx
        actor.y += actor.vy


def _place(actor: _Actor, rng: np.random.Generator) -> None:
    """Put an actor at a random in-frame start for its motion."""
    half_width, above, below = actor.footprint
    motion = actor.attrs["motion"]
    actor.vx = actor.vy = 0.0
    if motion == "orbit":
        ax = rng.uniform(half_width + ORBIT_RADIUS, WORLD_SIZE - half_width - ORBIT_RADIUS)
        ay = rng.uniform(above + ORBIT_RADIUS, WORLD_SIZE - below - ORBIT_RADIUS)
        theta = rng.uniform(0, 2 * math.pi)
        actor.x, actor.y = ax + ORBIT_RADIUS * math.cos(theta), ay + ORBIT_RADIUS * math.sin(theta)
    else:
        actor.x = float(rng.uniform(half_width, WORLD_SIZE - half_width))
        actor.y = float(rng.uniform(above, WORLD_SIZE - below))
    actor.x, actor.y = float(actor.x), float(actor.y)
    actor.last_visible = (actor.x, actor.y)
    _start_motion(actor, motion)
    if motion == "orbit":
        actor.anchor = (float(ax), float(ay))
        actor.angle = float(theta)
    elif motion == "bounce":
        # Start at a random phase of the bounce, with the matching speed.
        floor = WORLD_SIZE - below
        height = BOUNCE_PEAK_SPEED**2 / (2 * actor.gravity)
        actor.y = float(rng.uniform(max(above, floor - height), floor))
        speed = math.sqrt(max(0.0, 2 * actor.gravity * (actor.y - (floor - height))))
        actor.vy = speed if rng.random() < 0.5 else -speed
        actor.last_visible = (actor.x, actor.y)


def _place_apart(actors: list, rng: np.random.Generator) -> None:
    """Place actors so that they start without overlapping, when a few tries allow."""
    placed = []
    for actor in actors:
        for _ in range(20):
            _place(actor, rng)
            clear = all(
                math.hypot(actor.x - other.x, actor.y - other.y) > actor.footprint[0] + other.footprint[0]
                for other in placed
            )
            if clear:
                break
        placed.append(actor)


def _sample_attributes(seed: int, index: int, stated: ObjectSpec, others: list) -> dict:
    """Attributes for a new object; unstated ones come from the seed, avoiding the other objects' shape and colour.

    `others`: attribute dicts (possibly partial) of the scene's other objects.
    """
    rng = seeded_rng(seed, "attributes", index)
    taken = {name: {o.get(name) for o in others} for name in ("shape", "colour")}
    pools = {"size": SIZES, "colour": COLOUR_NAMES, "pattern": PATTERNS, "shape": SHAPES, "motion": MOTIONS}
    attrs = {}
    for name in OBJECT_ATTRIBUTES:  # always draw every attribute, so the stream never shifts
        order = [pools[name][i] for i in rng.permutation(len(pools[name]))]
        free = [v for v in order if v not in taken.get(name, ())] or order
        attrs[name] = getattr(stated, name) or free[0]
    return attrs


def _find_target(actors: list, target: ObjectSpec, prompt: str) -> "_Actor":
    for actor in actors:
        if all(actor.attrs[name] == getattr(target, name) for name in target.stated()):
            return actor
    scene = ", ".join(" ".join(a.attrs[n] for n in ("colour", "pattern", "shape")) for a in actors)
    raise TetherError(f"{prompt!r} names no object in the scene (it holds: {scene})")


class _World:
    """The running state of a timeline: background, camera and actors, advanced one frame at a time."""

    def __init__(self, seed: int, scale: float):
        self.seed, self.scale = seed, scale
        self.actors = []
        self.background = None
        self.camera_offset = 0.0  # world px
        self.camera_pan = 0.0

    def apply_scene(self, scene: SceneSpec, new_shot: bool) -> list:
        """Apply a scene description; returns the actors it creates.

        Unstated attributes keep their current value, or for a new object
        come from the seed. Without a cut, objects keep their positions.
        """
        if scene.background is not None:
            self.background = scene.background
        elif self.background is None:
            self.background = BACKGROUNDS[seeded_rng(self.seed, "background").integers(len(BACKGROUNDS))]
        self.camera_pan = scene.camera_pan
        kept, fresh = self.actors[: len(scene.objects)], []
        for i, spec in enumerate(scene.objects):
            if i < len(kept):
                actor = kept[i]
                previous_motion = actor.attrs["motion"]
                actor.attrs.update({n: getattr(spec, n) for n in spec.stated()})
                if not new_shot and actor.attrs["motion"] != previous_motion:
                    _start_motion(actor, actor.attrs["motion"])
            else:
                later = [{n: getattr(o, n) for n in o.stated()} for o in scene.objects[i + 1:]]
                others = [a.attrs for a in kept] + later
                attrs = _sample_attributes(self.seed, i, spec, others)
                actor = _Actor(i, attrs, frozenset(OBJECT_ATTRIBUTES), seeded_rng(self.seed, "motion", i))
                kept.append(actor)
                fresh.append(actor)
            actor.stated_now = spec.stated()
            actor.never_stated = actor.never_stated - spec.stated()
        self.actors = kept
        return fresh

    def apply_change(self, change: SceneChange, prompt: str) -> None:
        for actor in self.actors:
            actor.stated_now = frozenset()
        if change.target is None:
            self.camera_pan = change.camera_pan
            return
        actor = _find_target(self.actors, change.target, prompt)
        (name, value), = change.changes().items()
        actor.attrs[name] = value
        actor.stated_now = change.target.stated() | {name}
        actor.never_stated = actor.never_stated - actor.stated_now
        if name == "motion":
            _start_motion(actor, value)

    def start_shot(self, segment: int, placements: Optional[dict]) -> None:
        """New random positions and camera offset (first segment and scene cuts)."""
        _place_apart(self.actors, seeded_rng(self.seed, "placement", segment))
        self.camera_offset = float(seeded_rng(self.seed, "camera", segment).uniform(0, BACKGROUND_TILE_WIDTH))
        for actor_id, (x, y) in (placements or {}).items():
            actor = self.actors[actor_id]
            actor.x, actor.y, actor.last_visible = float(x), float(y), None

    def record(self, segment: int) -> _WorldFrame:
        snapshots = []
        for actor in self.actors:
            visible = actor.visible(self.scale)
            if visible:
                actor.last_visible = (actor.x, actor.y)
            a = actor.attrs
            snapshots.append(_ActorFrame(
                actor.id, (a["shape"], a["colour"], a["pattern"], a["size"]), a["motion"], actor.x, actor.y,
                visible, actor.stated_now, actor.never_stated,
            ))
        return _WorldFrame(segment, self.background, self.camera_offset, tuple(snapshots))

    def step(self) -> None:
        for actor in self.actors:
            _step(actor)
        self.camera_offset += self.camera_pan


def _simulate(segments: list, seed: int, scale: float, placements: Optional[dict] = None) -> list:
    """World state of every frame (list of _WorldFrame). `segments`: (statement, prompt, frames, cut).

    Trajectories do not depend on `scale`; only which frames count as visible
    (and so where a returning object re-enters) does, by a sub-pixel.
    """
    world, frames = _World(seed, scale), []
    for index, (statement, prompt, count, cut) in enumerate(segments):
        new_shot = index == 0 or cut
        fresh = []
        if isinstance(statement, SceneSpec):
            fresh = world.apply_scene(statement, new_shot)
        elif index == 0:
            raise TetherError(f"a timeline starts with a scene description ('a ...'), not {prompt!r}")
        else:
            world.apply_change(statement, prompt)
        if new_shot:
            world.start_shot(index, placements if index == 0 else None)
        elif fresh:
            _place_apart(fresh, seeded_rng(seed, "placement", index))
        for _ in range(count):
            frames.append(world.record(index))
            world.step()
    return frames


# ============================================================================ backgrounds


def _smoothstep(t):
    return t * t * (3 - 2 * t)


def _value_noise(rng, xs, ys, cell_x: float, cell_y: float):
    """Smooth noise in [0, 1] at world coords, periodic over the tile width (cell_x must divide it)."""
    columns = int(round(BACKGROUND_TILE_WIDTH / cell_x))
    rows = int(math.ceil(WORLD_SIZE / cell_y)) + 2
    lattice = rng.random((rows, columns)).astype(np.float32)
    u, v = xs / cell_x, ys / cell_y
    i0 = np.floor(u).astype(int)
    j0 = np.floor(v).astype(int)
    fu, fv = _smoothstep(u - i0)[None, :], _smoothstep(v - j0)[:, None]
    i0, i1 = i0 % columns, (i0 + 1) % columns
    top = lattice[j0][:, i0] * (1 - fu) + lattice[j0][:, i1] * fu
    bottom = lattice[j0 + 1][:, i0] * (1 - fu) + lattice[j0 + 1][:, i1] * fu
    return (top * (1 - fv) + bottom * fv).astype(np.float32)


def _rgb(*values):
    return np.array(values, dtype=np.float32)


def _grass(rng, xs, ys):
    patches = _value_noise(rng, xs, ys, 16, 16)[..., None] - 0.5
    blades = _value_noise(rng, xs, ys, 2, 6)[..., None] - 0.5
    depth = (ys / WORLD_SIZE)[:, None, None]
    return _rgb(66, 118, 46) + depth * _rgb(10, 16, 6) + patches * _rgb(26, 40, 18) + blades * _rgb(16, 34, 12)


def _desert(rng, xs, ys):
    warp = _value_noise(rng, xs, ys, 32, 16)
    dunes = np.sin(2 * np.pi * (ys[:, None] / 11 + 0.9 * warp + 2 * xs[None, :] / BACKGROUND_TILE_WIDTH))[..., None]
    grain = _value_noise(rng, xs, ys, 2, 2)[..., None] - 0.5
    return _rgb(212, 180, 124) + dunes * _rgb(16, 15, 11) + grain * _rgb(12, 11, 8)


def _ocean(rng, xs, ys):
    warp = _value_noise(rng, xs, ys, 32, 12)
    waves = np.sin(2 * np.pi * (ys[:, None] / 6 + 0.6 * warp + 3 * xs[None, :] / BACKGROUND_TILE_WIDTH))
    crests = np.clip((waves - 0.55) * 2.5, 0, 1)[..., None]
    depth = (ys / WORLD_SIZE)[:, None, None]
    swell = _value_noise(rng, xs, ys, 16, 8)[..., None] - 0.5
    return _rgb(34, 86, 140) - depth * _rgb(12, 24, 30) + crests * _rgb(40, 56, 60) + swell * _rgb(8, 14, 20)


def _night_sky(rng, xs, ys, scale):
    height, width = len(ys), len(xs)
    depth = (ys / WORLD_SIZE)[:, None, None]
    haze = _value_noise(rng, xs, ys, 32, 24)[..., None] - 0.5
    sky = _rgb(6, 8, 26) + depth * _rgb(14, 14, 30) + haze * _rgb(6, 6, 14)
    count = int(BACKGROUND_TILE_WIDTH * WORLD_SIZE / 90)
    stars = np.zeros((height, width), dtype=np.float32)
    rows = rng.integers(0, height, count)
    columns = rng.integers(0, width, count)
    np.add.at(stars, (rows, columns), rng.uniform(0.5, 1.0, count).astype(np.float32))
    # A light blur gives stars a soft core that survives sub-pixel panning.
    for axis, wrap in ((1, True), (0, False)):
        for _ in range(max(1, int(round(scale)))):
            before, after = np.roll(stars, 1, axis), np.roll(stars, -1, axis)
            if not wrap:
                before[0], after[-1] = 0, 0
            stars = 0.25 * before + 0.5 * stars + 0.25 * after
    return sky + np.clip(stars * 2.2, 0, 1)[..., None] * _rgb(235, 235, 215)


def _snow(rng, xs, ys):
    drifts = _value_noise(rng, xs, ys, 32, 20)[..., None] - 0.5
    sparkle = _value_noise(rng, xs, ys, 2, 2)[..., None] - 0.5
    return _rgb(226, 231, 240) + drifts * _rgb(-22, -16, -4) + sparkle * _rgb(10, 10, 8)


def _brick(rng, xs, ys):
    brick_w, brick_h, mortar = 16.0, 8.0, 1.25
    row = np.floor(ys / brick_h).astype(int)[:, None]
    shifted = xs[None, :] + (row % 2) * (brick_w / 2)
    column = np.floor(shifted / brick_w).astype(int) % int(BACKGROUND_TILE_WIDTH / brick_w)
    tint = rng.random((row.max() + 1, int(BACKGROUND_TILE_WIDTH / brick_w))).astype(np.float32)[row, column][..., None]
    grain = _value_noise(rng, xs, ys, 2, 2)[..., None] - 0.5
    bricks = _rgb(150, 62, 46) + (tint - 0.5) * _rgb(40, 20, 14) + grain * _rgb(14, 8, 6)
    is_mortar = ((ys[:, None] % brick_h) < mortar) | ((shifted % brick_w) < mortar)
    return np.where(is_mortar[..., None], _rgb(176, 170, 160) + grain * _rgb(10, 10, 10), bricks)


@lru_cache(maxsize=32)
def _background_tile(name: str, seed: int, size: int) -> np.ndarray:
    """[size, 4*size, 3] float32 texture, periodic in x, different for every seed."""
    scale = size / WORLD_SIZE
    rng = seeded_rng(seed, "texture", BACKGROUNDS.index(name))
    xs = ((np.arange(int(round(BACKGROUND_TILE_WIDTH * scale))) + 0.5) / scale).astype(np.float32)
    ys = ((np.arange(size) + 0.5) / scale).astype(np.float32)
    painters = {"grass": _grass, "desert": _desert, "ocean": _ocean, "snow": _snow, "brick": _brick}
    tile = _night_sky(rng, xs, ys, scale) if name == "night sky" else painters[name](rng, xs, ys)
    tile = np.clip(tile, 0, 255).astype(np.float32)
    tile.setflags(write=False)
    return tile


def _draw_background(out: np.ndarray, name: str, seed: int, offsets_px: np.ndarray) -> None:
    """Fill out [n, H, W, 3] with the tile seen at each camera offset (linear sub-pixel shift)."""
    size = out.shape[2]
    tile = _background_tile(name, seed, out.shape[1])
    width = tile.shape[1]
    # Wrap the first columns around so that every window is one contiguous slice.
    extended = np.concatenate([tile, tile[:, : size + 1]], axis=1)
    whole = np.floor(offsets_px)
    fractions = offsets_px - whole
    starts = whole.astype(np.int64) % width
    for t, (start, frac) in enumerate(zip(starts.tolist(), fractions.tolist())):
        left = extended[:, start:start + size]
        if frac == 0.0:
            out[t] = left
        else:
            np.multiply(left, 1.0 - frac, out=out[t])
            out[t] += frac * extended[:, start + 1:start + 1 + size]


# ============================================================================ shapes


def _polygon_distance(dx, dy, sides: int, inradius: float, normal_angle: float):
    """Signed distance to a regular polygon (exact inside, slightly short outside the corners)."""
    sector = 2 * np.pi / sides
    theta = np.arctan2(dy, dx) - normal_angle
    off_normal = (theta + sector / 2) % sector - sector / 2
    return np.hypot(dx, dy) * np.cos(off_normal) - inradius


def _star_distance(dx, dy, outer: float, inner: float):
    """Signed distance to a five-pointed star pointing up, by folding into one edge's wedge."""
    sector = 2 * np.pi / 5
    theta = np.arctan2(dy, dx) + np.pi / 2  # 0 = up (image y grows downwards)
    folded = np.abs((theta + sector / 2) % sector - sector / 2)
    rho = np.hypot(dx, dy)
    px, py = rho * np.cos(folded), rho * np.sin(folded)
    tip = np.array([outer, 0.0])
    valley = inner * np.array([np.cos(sector / 2), np.sin(sector / 2)])
    edge = valley - tip
    normal = np.array([-edge[1], edge[0]]) / np.hypot(*edge)
    if normal @ tip < 0:
        normal = -normal
    return (px - tip[0]) * normal[0] + (py - tip[1]) * normal[1]


def _shape_distance(shape: str, dx, dy, half_width: float):
    """Signed distance in render px from pixel offsets (dx, dy) to the edge of a shape `half_width` px to each side."""
    if shape == "circle":
        return np.hypot(dx, dy) - half_width
    if shape == "square":
        return _polygon_distance(dx, dy, 4, half_width, 0.0)
    if shape == "diamond":
        return _polygon_distance(dx, dy, 4, half_width / math.sqrt(2), np.pi / 4)
    if shape == "triangle":
        return _polygon_distance(dx, dy, 3, half_width / math.sqrt(3), np.pi / 2)
    if shape == "star":
        outer = half_width / _SIN_72
        return _star_distance(dx, dy, outer, _STAR_INNER_RATIO * outer)
    raise ValueError(shape)


class _Window(NamedTuple):
    rows: np.ndarray  # [n, H] frame row of each window row
    columns: np.ndarray  # [n, W]
    dx: np.ndarray  # [n, 1, W] pixel centre minus object centre, render px
    dy: np.ndarray  # [n, H, 1]
    distance: np.ndarray  # [n, H, W] signed distance to the edge
    alpha: np.ndarray  # [n, H, W] coverage, zero outside the footprint


def _window(look: tuple, cx: np.ndarray, cy: np.ndarray, scale: float) -> _Window:
    """Coverage of one object over its footprint box, for n frames at once."""
    shape, _, _, size = look
    half_width, above, below = (e * scale for e in footprint(shape, size))
    ncols = int(math.ceil(2 * half_width)) + 2
    nrows = int(math.ceil(above + below)) + 2
    columns = np.floor(cx - half_width).astype(np.int64)[:, None] + np.arange(ncols)
    rows = np.floor(cy - above).astype(np.int64)[:, None] + np.arange(nrows)
    dx = (columns + 0.5 - cx[:, None]).astype(np.float32)[:, None, :]
    dy = (rows + 0.5 - cy[:, None]).astype(np.float32)[:, :, None]
    inside = (np.abs(dx) < half_width) & (dy > -above) & (dy < below)
    distance = _shape_distance(shape, dx, dy, half_width)
    alpha = np.clip(0.5 - distance, 0, 1) * inside
    return _Window(rows, columns, dx, dy, distance, alpha)


def _coverage_at(look: tuple, cx, cy, scale: float, px, py):
    """Coverage of an object at arbitrary pixel centres px [n,1,W], py [n,H,1] (for occlusion)."""
    shape, _, _, size = look
    half_width, above, below = (e * scale for e in footprint(shape, size))
    dx, dy = px - cx[:, None, None], py - cy[:, None, None]
    inside = (np.abs(dx) < half_width) & (dy > -above) & (dy < below)
    return np.clip(0.5 - _shape_distance(shape, dx, dy, half_width), 0, 1) * inside


@contextmanager
def pattern_scale(factor: float):
    """Render stripes and dots `factor` times coarser inside the block (the world's own scale is 1)."""
    if factor <= 0:
        raise TetherError(f"pattern scale must be positive, got {factor}")
    previous, _pattern_scale[0] = _pattern_scale[0], float(factor)
    try:
        yield
    finally:
        _pattern_scale[0] = previous


def _paint(look: tuple, dx, dy, distance, scale: float):
    """RGB of the object at the given pixels: pattern fill inside a dark outline."""
    _, colour, pattern, _ = look
    base = np.array(COLOURS[colour], dtype=np.float32)
    coarser = _pattern_scale[0]
    if pattern == "striped":
        stripes = np.clip(0.5 + 0.9 * np.sin(2 * np.pi * (dx + dy) / (STRIPE_PERIOD * coarser * scale)), 0, 1)[:, None]
        fill = base * (1 - 0.55 * stripes)
    elif pattern == "dotted":
        period = DOT_PERIOD * coarser * scale
        gx, gy = dx / period, dy / period
        gap = np.hypot(gx - np.round(gx), gy - np.round(gy)) * period
        dots = np.clip(DOT_RADIUS * coarser * scale + 0.5 - gap, 0, 1)[:, None]
        fill = base * (1 - dots) + (0.2 * base + 0.8 * 255) * dots
    else:
        fill = np.broadcast_to(base, (len(dx), 3))
    outline_width = max(0.75, scale)
    inner = np.clip(0.5 - (distance + outline_width), 0, 1)[:, None]
    return OUTLINE_RGB + (fill - OUTLINE_RGB) * inner


def _draw_objects(canvas: np.ndarray, layers: list, scale: float) -> list:
    """Composite objects (in order, later on top) into canvas [n, H, W, 3]; returns each one's visible fraction [n]."""
    n, height, width, _ = canvas.shape
    fractions = []
    for index, (look, cx, cy) in enumerate(layers):
        win = _window(look, cx, cy, scale)
        rows_in = (win.rows >= 0) & (win.rows < height)
        columns_in = (win.columns >= 0) & (win.columns < width)
        in_frame = rows_in[:, :, None] & columns_in[:, None, :]
        drawn = win.alpha * in_frame
        t, i, j = np.nonzero(drawn)
        rows, columns = win.rows[t, i], win.columns[t, j]
        a = drawn[t, i, j][:, None]
        colour = _paint(look, win.dx[t, 0, j], win.dy[t, i, 0], win.distance[t, i, j], scale)
        canvas[t, rows, columns] = canvas[t, rows, columns] * (1 - a) + colour * a
        seen = drawn
        for later_look, later_cx, later_cy in layers[index + 1:]:
            px = (win.columns + 0.5).astype(np.float32)[:, None, :]
            py = (win.rows + 0.5).astype(np.float32)[:, :, None]
            seen = seen * (1 - _coverage_at(later_look, later_cx, later_cy, scale, px, py))
        total = win.alpha.sum(axis=(1, 2))
        fractions.append(np.where(total > 0, seen.sum(axis=(1, 2)) / np.maximum(total, 1e-9), 0.0))
    return fractions


# ============================================================================ public API


def _statements(source, num_frames: Optional[int]) -> list:
    """Normalise any accepted source to [(statement, prompt, frames, cut)]."""
    if isinstance(source, SceneSpec):
        return [(source, None, _need_frames(num_frames), False)]
    if isinstance(source, str):
        if "[" in source:
            source = parse_timeline(source)
        else:
            statement = parse(source)
            if not isinstance(statement, SceneSpec):
                raise TetherError(f"{source!r} changes a scene; start with a scene description ('a ...')")
            return [(statement, source, _need_frames(num_frames), False)]
    segments = [Segment(*s) if not isinstance(s, Segment) else s for s in source]
    if not segments:
        raise TetherError("empty timeline")
    out = [(parse(s.prompt), s.prompt, s.frames, bool(s.cut)) for s in segments]
    if any(frames <= 0 for _, _, frames, _ in out):
        raise TetherError("every timeline segment needs at least one frame (1/16 s)")
    if num_frames is not None:
        total = sum(frames for _, _, frames, _ in out)
        statement, prompt, frames, cut = out[-1]
        if num_frames >= total:
            out[-1] = (statement, prompt, frames + num_frames - total, cut)
        else:
            kept, left = [], num_frames
            for statement, prompt, frames, cut in out:
                if left > 0:
                    kept.append((statement, prompt, min(frames, left), cut))
                left -= frames
            out = kept
    return out


def _need_frames(num_frames) -> int:
    if num_frames is None or int(num_frames) <= 0:
        raise TetherError("rendering a single scene needs num_frames > 0")
    return int(num_frames)


def _check_size(size: int) -> int:
    if int(size) != size or size < 16:
        raise TetherError(f"frame size must be an integer >= 16, got {size}")
    return int(size)


def iter_clip(source, num_frames=None, seed: int = 0, size: int = 64, *, chunk_frames: int = 256,
              placements=None, only=None):
    """Like render_clip, but yields (frames [n,H,W,3] uint8, truths) chunks of at most `chunk_frames`."""
    size = _check_size(size)
    scale = size / WORLD_SIZE
    world = _simulate(_statements(source, num_frames), int(seed), scale, placements)
    indices = list(range(len(world))) if only is None else [int(i) for i in only]
    if any(not 0 <= i < len(world) for i in indices):
        raise TetherError(f"frame indices must lie in [0, {len(world)})")
    for start in range(0, len(indices), chunk_frames):
        chunk = indices[start:start + chunk_frames]
        yield _draw([world[i] for i in chunk], chunk, int(seed), size, scale)


def render_clip(source, num_frames=None, seed: int = 0, size: int = 64, *, placements=None, only=None):
    """Render a clip: returns (frames uint8 [T, size, size, 3], list of FrameTruth).

    `source`: a SceneSpec, a scene prompt ("a red circle bounces on grass"), a
    timeline string ("a red circle bounces on grass[4s] | the circle turns
    green[4s]") or a list of Segment. `num_frames` is required for a single
    scene; for a timeline it defaults to the timeline's length (16 fps) and
    otherwise cuts or extends the last segment. Unstated attributes and all
    positions come from `seed`. `placements`: {object index: (x, y)} start
    positions in world px (64-px frame) for the first shot, used by scripted
    episodes. `only`: frame indices to draw (all frames are still simulated),
    e.g. to sample training frames from long clips cheaply.
    """
    chunks = list(iter_clip(source, num_frames, seed, size, placements=placements, only=only))
    frames = np.concatenate([c[0] for c in chunks])
    truths = [t for c in chunks for t in c[1]]
    return frames, truths


def render_background(background: str, camera_offsets, seed: int = 0, size: int = 64) -> np.ndarray:
    """Frames uint8 [n, size, size, 3] of the background alone at the given camera offsets (render px).

    A clip's frame equals this wherever no object is drawn, e.g.
    render_background(t.background, [t.camera_offset], seed, size) for a FrameTruth t.
    """
    if background not in BACKGROUNDS:
        raise TetherError(f"unknown background {background!r}; known: {', '.join(BACKGROUNDS)}")
    size = _check_size(size)
    offsets = np.asarray(camera_offsets, dtype=np.float64).reshape(-1)
    canvas = np.empty((len(offsets), size, size, 3), dtype=np.float32)
    _draw_background(canvas, background, int(seed), offsets)
    canvas += 0.5
    return np.clip(canvas, 0, 255, out=canvas).astype(np.uint8)


def _draw(world: list, indices: list, seed: int, size: int, scale: float):
    canvas = np.empty((len(world), size, size, 3), dtype=np.float32)
    fractions = np.zeros((len(world), 2), dtype=np.float64)
    # Frames with the same background and the same looks form a run drawn in one go.
    start = 0
    while start < len(world):
        key = (world[start].background, tuple((a.id, a.look) for a in world[start].actors))
        end = start + 1
        while end < len(world) and (world[end].background, tuple((a.id, a.look) for a in world[end].actors)) == key:
            end += 1
        run = world[start:end]
        offsets = np.array([f.camera_offset for f in run]) * scale
        _draw_background(canvas[start:end], run[0].background, seed, offsets)
        layers = []
        for slot, actor in enumerate(run[0].actors):
            cx = np.array([f.actors[slot].x for f in run]) * scale
            cy = np.array([f.actors[slot].y for f in run]) * scale
            layers.append((actor.look, cx, cy))
        for slot, fraction in enumerate(_draw_objects(canvas[start:end], layers, scale)):
            fractions[start:end, slot] = fraction
        start = end
    canvas += 0.5  # round to nearest on the cast below
    frames = np.clip(canvas, 0, 255, out=canvas).astype(np.uint8)
    truths = []
    for k, f in enumerate(world):
        objects = tuple(
            ObjectTruth(
                a.id, *a.look, a.motion, a.x * scale, a.y * scale, a.visible,
                float(fractions[k, slot]) if a.visible else 0.0, a.stated, a.sampled,
            )
            for slot, a in enumerate(f.actors)
        )
        truths.append(FrameTruth(indices[k], f.segment, f.background, f.camera_offset * scale, objects))
    return frames, truths
