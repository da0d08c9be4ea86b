"""The toy world's prompt grammar: scene descriptions and timeline sentences.

Two kinds of prompt, both small enough to parse back exactly:

  scene description   "a red striped circle bounces on grass"
                      "a blue square and a small yellow dotted triangle drift left in the desert"
                      "a large red solid star rests and a green circle orbits by a brick wall as the camera pans left"
  timeline sentence   "the circle turns green", "the red circle becomes dotted",
                      "the circle becomes a star", "the circle drifts left", "the circle stops",
                      "the circle is out of view", "the circle comes back", "the camera pans right"

A noun phrase states size, colour, pattern and shape in that order; any of
them may be left out ("a circle bounces", "a red shape bounces"), and so may
the verb and the background. Left-out attributes come back from `parse` as
None. Timelines chain prompts: "a red circle bounces on grass[4s] | the circle
turns green[4s] | a green circle rests in the snow[3s#]" (`#` = scene cut).
"""

import dataclasses
import re

from tether.errors import TetherError

from .scene import ObjectSpec, SceneChange, SceneSpec, Segment
from .vocab import (
    ANY_SHAPE_NOUN, ARTICLES, AWAY_PHRASE, BACKGROUND_PHRASES, BACKGROUNDS, CAMERA_PAN_SUFFIX, CAMERA_PAN_VERB,
    CAMERA_PANS, CAMERA_SUBJECT, CHANGE_VERB, COLOUR_CHANGE_VERB, COLOUR_NAMES, CONJUNCTION, DEFINITE, MOTION_VERBS,
    MOTIONS, OBJECT_ATTRIBUTES, PATTERNS, RETURN_PHRASE, SHAPES, SIZES, STOP_VERB,
)

_ADJECTIVE_KIND = {
    **{w: "size" for w in SIZES}, **{w: "colour" for w in COLOUR_NAMES}, **{w: "pattern" for w in PATTERNS},
}
_NOUN_PHRASE_ORDER = ("size", "colour", "pattern")
_SINGULAR_VERBS = {forms[0]: motion for motion, forms in MOTION_VERBS.items()}
_PLURAL_VERBS = {forms[1]: motion for motion, forms in MOTION_VERBS.items()}
_OMITTABLE = OBJECT_ATTRIBUTES + ("background",)


# ----------------------------------------------------------------------------- describe


def _noun_phrase(spec: ObjectSpec, article: str) -> str:
    words = [getattr(spec, kind) for kind in _NOUN_PHRASE_ORDER if getattr(spec, kind) is not None]
    words.append(spec.shape or ANY_SHAPE_NOUN)
    if article == "a" and words[0][0] in "aeiou":
        article = "an"
    return " ".join([article, *words])


def _pan_direction(speed: float) -> str:
    for direction, pan in CAMERA_PANS.items():
        if pan == speed:
            return direction
    raise TetherError(f"the grammar only states camera pans of {sorted(CAMERA_PANS.values())} px/frame, got {speed}")


def _describe_change(change: SceneChange) -> str:
    if change.target is None:
        if change.camera_pan == 0:
            return f"{CAMERA_SUBJECT} {STOP_VERB}"
        return f"{CAMERA_SUBJECT} {CAMERA_PAN_VERB} {_pan_direction(change.camera_pan)}"
    subject = _noun_phrase(change.target, DEFINITE)
    (name, value), = change.changes().items()
    if name == "colour":
        return f"{subject} {COLOUR_CHANGE_VERB} {value}"
    if name in ("pattern", "size"):
        return f"{subject} {CHANGE_VERB} {value}"
    if name == "shape":
        return f"{subject} {CHANGE_VERB} {_noun_phrase(ObjectSpec(shape=value), 'a')}"
    verb = {"rest": STOP_VERB, "away": AWAY_PHRASE, "return": RETURN_PHRASE}.get(value)
    return f"{subject} {verb or MOTION_VERBS[value][0]}"


def describe(statement, omit=()) -> str:
    """The prompt for a SceneSpec (or a SceneChange sentence).

    `omit`: attribute names to leave out of every object ("size", "colour",
    "pattern", "shape", "motion") and/or "background". Attributes that are
    already None are left out too. `parse(describe(scene))` gives the scene back.
    """
    if isinstance(statement, SceneChange):
        return _describe_change(statement)
    unknown = set(omit) - set(_OMITTABLE)
    if unknown:
        raise TetherError(f"cannot omit {sorted(unknown)}; omittable: {', '.join(_OMITTABLE)}")
    drop = {name: None for name in omit if name in OBJECT_ATTRIBUTES}
    objects = [ObjectSpec(**{**vars(o), **drop}) for o in statement.objects]
    motions = {o.motion for o in objects}
    if motions & {"away", "return"}:
        raise TetherError("a scene description cannot state a scripted motion (away/return)")
    if len(objects) == 2 and len(motions) == 1:
        (motion,) = motions
        clause = f" {CONJUNCTION} ".join(_noun_phrase(o, "a") for o in objects)
        if motion is not None:
            clause += " " + MOTION_VERBS[motion][1]
    else:
        parts = []
        for o in objects:
            verb = "" if o.motion is None else " " + MOTION_VERBS[o.motion][0]
            parts.append(_noun_phrase(o, "a") + verb)
        clause = f" {CONJUNCTION} ".join(parts)
    if statement.background is not None and "background" not in omit:
        clause += " " + BACKGROUND_PHRASES[statement.background]
    if statement.camera_pan:
        clause += f" {CAMERA_PAN_SUFFIX} {_pan_direction(statement.camera_pan)}"
    return clause


# ----------------------------------------------------------------------------- parse


def _fail(prompt: str, why: str):
    raise TetherError(f"cannot read prompt {prompt!r}: {why}")


def _strip_suffix(words: list, phrase: str):
    """(words without `phrase` at the end, True) or (words, False)."""
    tail = phrase.split()
    if len(words) > len(tail) and words[-len(tail):] == tail:
        return words[: -len(tail)], True
    return words, False


def _parse_noun_phrase(words: list, prompt: str):
    """ObjectSpec (no motion) and the words after the noun."""
    found = {}
    for i, word in enumerate(words):
        if word in SHAPES or word == ANY_SHAPE_NOUN:
            shape = word if word in SHAPES else None
            return ObjectSpec(shape=shape, **found), words[i + 1:]
        kind = _ADJECTIVE_KIND.get(word)
        if kind is None:
            _fail(prompt, f"unknown word {word!r} (shapes: {', '.join(SHAPES)}; colours: {', '.join(COLOUR_NAMES)}; "
                          f"patterns: {', '.join(PATTERNS)}; sizes: {', '.join(SIZES)})")
        if kind in found:
            _fail(prompt, f"two {kind}s for one object ({found[kind]!r} and {word!r})")
        found[kind] = word
    _fail(prompt, f"no shape noun (one of {', '.join(SHAPES)} or {ANY_SHAPE_NOUN!r})")


def _parse_scene(words: list, prompt: str) -> SceneSpec:
    camera_pan = 0.0
    for direction, speed in CAMERA_PANS.items():
        words, found = _strip_suffix(words, f"{CAMERA_PAN_SUFFIX} {direction}")
        if found:
            camera_pan = speed
            break
    background = None
    for name in BACKGROUNDS:
        words, found = _strip_suffix(words, BACKGROUND_PHRASES[name])
        if found:
            background = name
            break
    parts, current = [], []
    for word in words:
        if word == CONJUNCTION:
            parts.append(current)
            current = []
        else:
            current.append(word)
    parts.append(current)
    if len(parts) > 2:
        _fail(prompt, "a scene holds at most two objects")
    objects, verbs = [], []
    for part in parts:
        if not part or part[0] not in ARTICLES:
            _fail(prompt, "each object starts with 'a' or 'an'")
        spec, rest = _parse_noun_phrase(part[1:], prompt)
        verb = " ".join(rest)
        if verb and verb not in _SINGULAR_VERBS and verb not in _PLURAL_VERBS:
            known = ", ".join(v[0] for v in MOTION_VERBS.values())
            places = ", ".join(BACKGROUND_PHRASES.values())
            _fail(prompt, f"unknown verb or place {verb!r} (verbs: {known}; places: {places})")
        objects.append(spec)
        verbs.append(verb)
    if len(objects) == 2 and not verbs[0] and verbs[1] in _PLURAL_VERBS:
        motions = [_PLURAL_VERBS[verbs[1]]] * 2  # "a circle and a square bounce"
    else:
        if any(v in _PLURAL_VERBS and v not in _SINGULAR_VERBS for v in verbs):
            _fail(prompt, "verb does not agree with its subject")
        motions = [_SINGULAR_VERBS[v] if v else None for v in verbs]
    objects = [ObjectSpec(o.shape, o.colour, o.pattern, o.size, m) for o, m in zip(objects, motions)]
    return SceneSpec(background=background, objects=tuple(objects), camera_pan=camera_pan)


def _parse_change(words: list, prompt: str) -> SceneChange:
    text = " ".join(words)
    if text.startswith(CAMERA_SUBJECT + " "):
        rest = text[len(CAMERA_SUBJECT) + 1:]
        if rest == STOP_VERB:
            return SceneChange(camera_pan=0.0)
        for direction, speed in CAMERA_PANS.items():
            if rest == f"{CAMERA_PAN_VERB} {direction}":
                return SceneChange(camera_pan=speed)
        _fail(prompt, f"the camera can only '{CAMERA_PAN_VERB} left', '{CAMERA_PAN_VERB} right' or '{STOP_VERB}'")
    target, rest = _parse_noun_phrase(words[1:], prompt)
    if not rest:
        _fail(prompt, "a timeline sentence needs a verb ('the circle turns green', 'the circle stops')")
    head, tail = rest[0], " ".join(rest[1:])
    if head == COLOUR_CHANGE_VERB and tail in COLOUR_NAMES:
        return SceneChange(target=target, colour=tail)
    if head == CHANGE_VERB:
        if tail in PATTERNS:
            return SceneChange(target=target, pattern=tail)
        if tail in SIZES:
            return SceneChange(target=target, size=tail)
        if len(rest) == 3 and rest[1] in ARTICLES and rest[2] in SHAPES:
            return SceneChange(target=target, shape=rest[2])
        _fail(prompt, f"'{CHANGE_VERB}' takes a pattern, a size or 'a <shape>'")
    verb = " ".join(rest)
    scripted = {STOP_VERB: "rest", AWAY_PHRASE: "away", RETURN_PHRASE: "return"}
    motion = scripted.get(verb) or _SINGULAR_VERBS.get(verb)
    if motion is None:
        _fail(prompt, f"unknown change {verb!r} (e.g. '{COLOUR_CHANGE_VERB} green', '{CHANGE_VERB} striped', "
                      f"'{STOP_VERB}', '{AWAY_PHRASE}', '{RETURN_PHRASE}', '{MOTION_VERBS['bounce'][0]}')")
    return SceneChange(target=target, motion=motion)


def parse(prompt: str):
    """A prompt back as a partial spec.

    Scene descriptions ("a ...") give a SceneSpec, timeline sentences
    ("the ...") a SceneChange; unstated attributes are None. Raises
    TetherError for anything outside the grammar.
    """
    words = prompt.strip().lower().rstrip(".").split()
    if not words:
        raise TetherError("empty prompt")
    if words[0] in ARTICLES:
        return _parse_scene(words, prompt)
    if words[0] == DEFINITE:
        return _parse_change(words, prompt)
    _fail(prompt, "a scene description starts with 'a'/'an', a timeline sentence with 'the'")


def one_word_variants(prompt: str) -> dict:
    """{(attribute, object index or None): (index of the true value, [prompt for each value])}.

    One entry per attribute the scene description states: the background
    (object None), and each object's size, colour, pattern and shape. Each
    variant differs from `prompt` in that one word; the one at the true
    value's index is `prompt` itself, as `describe` writes it.
    """
    scene = parse(prompt)
    variants = {}
    if scene.background is not None:
        variants[("background", None)] = (BACKGROUNDS.index(scene.background),
                                          [describe(dataclasses.replace(scene, background=b)) for b in BACKGROUNDS])
    for index, subject in enumerate(scene.objects):
        for name, values in (("shape", SHAPES), ("colour", COLOUR_NAMES), ("pattern", PATTERNS), ("size", SIZES)):
            value = getattr(subject, name)
            if value is None:
                continue
            prompts = []
            for v in values:
                objects = list(scene.objects)
                objects[index] = dataclasses.replace(subject, **{name: v})
                prompts.append(describe(dataclasses.replace(scene, objects=tuple(objects))))
            variants[(name, index)] = (values.index(value), prompts)
    return variants


# ----------------------------------------------------------------------------- random prompts


def random_scene(rng) -> SceneSpec:
    """A fully stated random scene: one or two objects with different shapes and colours."""
    count = 2 if rng.random() < 0.4 else 1
    shapes = rng.choice(len(SHAPES), size=count, replace=False)
    colours = rng.choice(len(COLOUR_NAMES), size=count, replace=False)
    objects = tuple(
        ObjectSpec(
            shape=SHAPES[shapes[i]],
            colour=COLOUR_NAMES[colours[i]],
            pattern=PATTERNS[rng.integers(len(PATTERNS))],
            size=SIZES[rng.integers(len(SIZES))],
            motion=MOTIONS[rng.integers(len(MOTIONS))],
        )
        for i in range(count)
    )
    pan = 0.0
    if rng.random() < 0.3:
        pan = float(list(CAMERA_PANS.values())[rng.integers(len(CAMERA_PANS))])
    return SceneSpec(background=BACKGROUNDS[rng.integers(len(BACKGROUNDS))], objects=objects, camera_pan=pan)


def random_prompt(rng, omit_probability: float = 0.2) -> str:
    """A random scene description; each attribute kind is left out with `omit_probability`."""
    scene = random_scene(rng)
    omit = [name for name in _OMITTABLE if rng.random() < omit_probability]
    return describe(scene, omit=omit)


# ----------------------------------------------------------------------------- timelines

_SEGMENT = re.compile(r"^\s*(?P<prompt>[^\[\]|]*?)\s*\[\s*(?P<seconds>\d+(?:\.\d+)?)\s*s\s*(?P<cut>#?)\s*\]\s*$")


def parse_timeline(text: str) -> list:
    """Segments of a timeline string "prompt[4s] | prompt[2.5s#]" (every segment needs a duration)."""
    segments = []
    for piece in text.split("|"):
        match = _SEGMENT.match(piece)
        if match is None or not match["prompt"]:
            raise TetherError(f"cannot read timeline segment {piece.strip()!r}: "
                              "expected 'prompt[<seconds>s]' or 'prompt[<seconds>s#]'")
        seconds = float(match["seconds"])
        if seconds <= 0:
            raise TetherError(f"timeline segment {piece.strip()!r} has no duration")
        segments.append(Segment(match["prompt"], seconds, bool(match["cut"])))
    return segments


def format_timeline(segments) -> str:
    """The timeline string of `segments` (inverse of parse_timeline)."""
    return " | ".join(f"{s.prompt}[{s.seconds:g}s{'#' if s.cut else ''}]" for s in segments)
