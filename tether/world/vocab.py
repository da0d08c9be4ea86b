"""The toy world's vocabulary: every attribute value and every fixed phrase.

The renderer, the prompt grammar and the probe all read their class lists from
here, so adding a colour or a shape is a one-line change in this file (the
probe must then be retrained: its class order is this order).

World geometry is defined on a 64x64 frame ("world pixels"); renders at other
sizes scale positions, sizes and speeds by `size / 64`.
"""

FPS = 16
WORLD_SIZE = 64  # side of the frame the world's units are defined on

BACKGROUNDS = ("grass", "desert", "ocean", "night sky", "snow", "brick")
# Each background has one fixed phrase so that the parser can find it again.
BACKGROUND_PHRASES = {
    "grass": "on grass",
    "desert": "in the desert",
    "ocean": "over the ocean",
    "night sky": "under the night sky",
    "snow": "in the snow",
    "brick": "by a brick wall",
}

SHAPES = ("circle", "square", "triangle", "diamond", "star")
ANY_SHAPE_NOUN = "shape"  # noun used when a prompt leaves the shape out

# Saturated fills: the backgrounds are all muted or dark, and every object has
# a dark outline, so each colour stays readable on each background.
COLOURS = {
    "red": (225, 35, 35),
    "orange": (250, 140, 20),
    "yellow": (250, 230, 40),
    "green": (40, 205, 65),
    "blue": (45, 95, 240),
    "purple": (160, 55, 215),
}
COLOUR_NAMES = tuple(COLOURS)

PATTERNS = ("solid", "striped", "dotted")

SIZES = ("small", "large")
# Nominal diameter in world pixels; "small" stays well above 10 px at 64x64.
SIZE_DIAMETERS = {"small": 14.0, "large": 22.0}

MOTIONS = ("bounce", "drift left", "drift right", "orbit", "rest")
# Motions only reachable through timeline sentences, used by re-entry scripts.
SCRIPTED_MOTIONS = ("away", "return")

# (singular, plural) verb phrase for each motion a scene description can state.
MOTION_VERBS = {
    "bounce": ("bounces", "bounce"),
    "drift left": ("drifts left", "drift left"),
    "drift right": ("drifts right", "drift right"),
    "orbit": ("orbits", "orbit"),
    "rest": ("rests", "rest"),
}
STOP_VERB = "stops"  # how a timeline sentence says "switches to rest"
AWAY_PHRASE = "is out of view"
RETURN_PHRASE = "comes back"

# Camera pan speed in world pixels per frame; positive moves the view right.
CAMERA_PANS = {"left": -0.5, "right": 0.5}
CAMERA_PAN_SUFFIX = "as the camera pans"  # scene description: "... as the camera pans left"
CAMERA_SUBJECT = "the camera"  # timeline sentence: "the camera pans left" / "the camera stops"
CAMERA_PAN_VERB = "pans"

# Attribute names an ObjectSpec carries, in the order a noun phrase states them
# (size, colour, pattern, shape); motion is the verb.
OBJECT_ATTRIBUTES = ("size", "colour", "pattern", "shape", "motion")
ATTRIBUTE_VALUES = {
    "size": SIZES,
    "colour": COLOUR_NAMES,
    "pattern": PATTERNS,
    "shape": SHAPES,
    "motion": MOTIONS + SCRIPTED_MOTIONS,
}

ARTICLES = ("a", "an")
DEFINITE = "the"
CONJUNCTION = "and"
COLOUR_CHANGE_VERB = "turns"  # "the circle turns green"
CHANGE_VERB = "becomes"  # "the circle becomes striped", "the circle becomes a star"


def vocabulary() -> list:
    """Every word the prompt grammar can produce, sorted (for a word-level tokenizer)."""
    phrases = [
        *ARTICLES, DEFINITE, CONJUNCTION, ANY_SHAPE_NOUN, COLOUR_CHANGE_VERB, CHANGE_VERB,
        *BACKGROUND_PHRASES.values(), *SHAPES, *COLOUR_NAMES, *PATTERNS, *SIZES,
        *(form for forms in MOTION_VERBS.values() for form in forms),
        STOP_VERB, AWAY_PHRASE, RETURN_PHRASE,
        *CAMERA_PANS, CAMERA_PAN_SUFFIX, CAMERA_SUBJECT, CAMERA_PAN_VERB,
    ]
    return sorted({word for phrase in phrases for word in phrase.split()})
