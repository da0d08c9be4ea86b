"""tether.eval.toy: exact metrics for toy-world videos, read back with the probe.

When every prompt of the timeline parses with the toy world's grammar
(tether.world.prompts.parse), the probe reads each frame's background and
objects, and we score against what the prompts state:

  adherence        per segment and attribute (background, shape, colour,
                   pattern, size): share of scored frames whose reading has the
                   stated value. A prompt's statements accumulate within a scene:
                   after "a red circle ..." then "the circle turns green" the
                   circle is expected green *and* still a circle.
  identity         attributes no prompt stated: share of frames whose reading
                   equals the object's first appearance in the scene (the mode
                   over its first FIRST_LOOK frames), counted again whenever it
                   re-enters the view, so a subject that comes back changed loses.
  background       share of frames whose background equals the scene's first.
  switches         for each segment after the first: adherence to what the
                   switch changed, and chunks until the video follows it (the
                   first chunk of the segment, counting from 0, in which at least
                   FOLLOW_SHARE of the scored frames show every changed value).
  abrupt resets    frames after a switch whose reading shows the *first*
                   segment's value for a changed attribute again, after the video
                   had already followed the switch: a jump back to frame 0's
                   content, which recaching / sink policies are prone to.

Scored frames: those where the probe finds the object; an expected object is
matched to the detection agreeing on most stated attributes (two objects:
the better of the two pairings). Frames with no detection (the subject out of
view) are skipped rather than counted as misses. Motion is not read by the
probe and is not scored.
"""

from collections import Counter

import numpy as np

from tether.world.prompts import parse
from tether.world.scene import SceneChange, SceneSpec

READ_ATTRIBUTES = ("shape", "colour", "pattern", "size")
FIRST_LOOK = 4          # frames whose mode fixes an open attribute's reference value
FOLLOW_SHARE = 0.8      # share of a chunk's scored frames that must show the new value
FIRST_CHUNK_FRAMES, CHUNK_FRAMES = 9, 12


def parse_world_timeline(prompts: list):
    """Parsed specs of the prompts, or None when they are not a toy-world timeline."""
    try:
        parsed = [parse(p) for p in prompts]
    except Exception:  # TetherError for anything outside the grammar
        return None
    return parsed if parsed and isinstance(parsed[0], SceneSpec) else None


def expected_states(parsed: list) -> list:
    """Per segment: {"scene": scene index, "background": value or None, "objects": [{attr: value}]}.

    Stated values accumulate within a scene; a new scene description starts afresh.
    """
    states, scene, background, objects = [], -1, None, []
    for spec in parsed:
        if isinstance(spec, SceneSpec):
            scene += 1
            background = spec.background
            objects = [{a: getattr(o, a) for a in READ_ATTRIBUTES if getattr(o, a) is not None} for o in spec.objects]
        elif isinstance(spec, SceneChange) and spec.target is not None:
            target = {a: getattr(spec.target, a) for a in READ_ATTRIBUTES if getattr(spec.target, a) is not None}
            objects = [dict(o) for o in objects]
            for o in objects:  # the first object the target's words do not contradict
                if all(o.get(a, v) == v for a, v in target.items()):
                    o.update({a: v for a, v in spec.changes().items() if a in READ_ATTRIBUTES})
                    break
        states.append({"scene": scene, "background": background, "objects": [dict(o) for o in objects]})
    return states


def _match(expected: list, detections: list) -> list:
    """For each expected object, its detection (or None): the pairing agreeing on most stated attributes."""
    def agree(e, d):
        return sum(d[a] == v for a, v in e.items())
    if not detections:
        return [None] * len(expected)
    if len(expected) == 1:
        return [max(detections, key=lambda d: agree(expected[0], d))]
    if len(detections) == 1:
        best = max(range(len(expected)), key=lambda k: agree(expected[k], detections[0]))
        return [detections[0] if k == best else None for k in range(len(expected))]
    straight = agree(expected[0], detections[0]) + agree(expected[1], detections[1])
    crossed = agree(expected[0], detections[1]) + agree(expected[1], detections[0])
    return [detections[0], detections[1]] if straight >= crossed else [detections[1], detections[0]]


def _share(hits: list):
    return float(np.mean(hits)) if hits else None


def chunk_of(frame_in_segment: int, segment_starts_at_frame_0: bool) -> int:
    """Chunk index within a segment of a frame offset (the video's first chunk holds 9 frames)."""
    if segment_starts_at_frame_0:
        return 0 if frame_in_segment < FIRST_CHUNK_FRAMES else 1 + (frame_in_segment - FIRST_CHUNK_FRAMES) // CHUNK_FRAMES
    return frame_in_segment // CHUNK_FRAMES


def _track(readings: list, parsed: list, segment_frames: list):
    """(states, matched, segment_of, references, scene_background) shared by toy_metrics and frame_scores.

    matched[t]: the detection (or None) per expected object of frame t's
    segment; references[(scene, object)]: {attr: value at its first look};
    scene_background[scene]: the scene's first background reading.
    """
    states = expected_states(parsed)
    matched, segment_of = {}, {}
    for s, (first, end) in enumerate(segment_frames):
        for t in range(first, min(end, len(readings))):
            present = [d for d in readings[t]["objects"] if d["present"]]
            matched[t] = _match(states[s]["objects"], present)
            segment_of[t] = s

    references, first_looks = {}, {}
    for t in sorted(matched):
        state = states[segment_of[t]]
        for k, det in enumerate(matched[t]):
            if det is None:
                continue
            looks = first_looks.setdefault((state["scene"], k), [])
            if len(looks) < FIRST_LOOK:
                looks.append(det)
    for key, looks in first_looks.items():
        references[key] = {a: Counter(d[a] for d in looks).most_common(1)[0][0] for a in READ_ATTRIBUTES}
    scene_background = {}
    for t in sorted(matched):
        scene_background.setdefault(states[segment_of[t]]["scene"], readings[t]["background"])
    return states, matched, segment_of, references, scene_background


def frame_scores(readings: list, parsed: list, segment_frames: list) -> list:
    """Per frame, the toy metrics' ingredients, for metrics over time (tether.eval.series).

    Each entry: {"adherence": share of the stated values the frame shows (background and the read
    attributes of detected objects), "identity": share of open attributes equal to their first look,
    "background": 1.0 if the background is the scene's first else 0.0}; a value is None where the
    frame has nothing to score (e.g. identity with the subject out of view). Frames outside every
    segment are None.
    """
    states, matched, segment_of, references, scene_background = _track(readings, parsed, segment_frames)
    out = [None] * len(readings)
    for t in sorted(matched):
        state = states[segment_of[t]]
        stated, identity = [], []
        if state["background"] is not None:
            stated.append(readings[t]["background"] == state["background"])
        for k, (o, det) in enumerate(zip(state["objects"], matched[t])):
            if det is None:
                continue
            for a in READ_ATTRIBUTES:
                if a in o:
                    stated.append(det[a] == o[a])
                else:
                    identity.append(det[a] == references[(state["scene"], k)][a])
        out[t] = {"adherence": _share(stated), "identity": _share(identity),
                  "background": float(readings[t]["background"] == scene_background.get(state["scene"]))}
    return out


def toy_metrics(readings: list, parsed: list, segment_frames: list) -> dict:
    """Toy-world metrics (see the module docstring).

    `readings`: Probe.read output, one per frame. `parsed`: world specs per
    segment. `segment_frames`: (first, end) frame range per segment.
    """
    states, matched, segment_of, references, scene_background = _track(readings, parsed, segment_frames)

    segments = []
    for s, (first, end) in enumerate(segment_frames):
        state = states[s]
        frames = [t for t in range(first, min(end, len(readings)))]
        adherence = {}
        if state["background"] is not None:
            adherence["background"] = _share([readings[t]["background"] == state["background"] for t in frames])
        for a in READ_ATTRIBUTES:
            hits = [det[a] == o[a] for t in frames for o, det in zip(state["objects"], matched[t])
                    if a in o and det is not None]
            if hits:
                adherence[a] = _share(hits)
        identity = {}
        for a in READ_ATTRIBUTES:
            hits = [det[a] == references[(state["scene"], k)][a] for t in frames
                    for k, (o, det) in enumerate(zip(state["objects"], matched[t])) if a not in o and det is not None]
            if hits:
                identity[a] = _share(hits)
        stated = [v for v in adherence.values() if v is not None]
        segments.append({
            "frames": [first, min(end, len(readings))],
            "adherence": adherence,
            "adherence_mean": _share(stated),
            "identity": identity,
            "background_stability": _share([readings[t]["background"] == scene_background.get(state["scene"])
                                            for t in frames]),
            "scored_frames": sum(any(d is not None for d in matched[t]) for t in frames),
        })

    switches = [_switch(s, states, segment_frames, matched, readings) for s in range(1, len(segment_frames))]
    overall_adherence = [seg["adherence_mean"] for seg in segments if seg["adherence_mean"] is not None]
    overall_identity = [v for seg in segments for v in seg["identity"].values()]
    return {
        "adherence": _share(overall_adherence),
        "identity_retention": _share(overall_identity),
        "background_stability": _share([seg["background_stability"] for seg in segments
                                        if seg["background_stability"] is not None]),
        "abrupt_resets": sum(sw["abrupt_resets"] for sw in switches),
        "segments": segments,
        "switches": switches,
    }


def _changed(before: dict, after: dict) -> list:
    """[(object index or None for background, attribute, old value, new value)] a switch changes."""
    out = []
    if after["scene"] == before["scene"]:
        for k, (o_old, o_new) in enumerate(zip(before["objects"], after["objects"])):
            out += [(k, a, o_old.get(a), v) for a, v in o_new.items() if o_old.get(a) != v]
    else:  # a new scene: every stated value is "changed"; the old scene's are what a reset shows
        old_first = before["objects"][0] if before["objects"] else {}
        for k, o_new in enumerate(after["objects"]):
            out += [(k, a, old_first.get(a) if k == 0 else None, v) for a, v in o_new.items()]
        if after["background"] is not None:
            out.append((None, "background", before["background"], after["background"]))
    return out


def _switch(s: int, states: list, segment_frames: list, matched: dict, readings: list) -> dict:
    """Adherence to what switch into segment `s` changed, chunks until followed, abrupt resets."""
    changes = _changed(states[s - 1], states[s])
    first, end = segment_frames[s]
    first_state = states[0]

    def shows(t, k, a, value):
        if k is None:
            return readings[t]["background"] == value
        det = matched[t][k] if k < len(matched[t]) else None
        return None if det is None else det[a] == value

    per_chunk, hits, resets, followed = {}, [], 0, False
    for t in range(first, min(end, len(readings))):
        frame_hits = [shows(t, k, a, new) for k, a, _, new in changes]
        frame_hits = [h for h in frame_hits if h is not None]
        if not frame_hits:
            continue
        ok = all(frame_hits)
        hits.append(ok)
        per_chunk.setdefault(chunk_of(t - first, first == 0), []).append(ok)
        if ok:
            followed = True
        elif followed:
            # A jump back to frame 0's content: a changed attribute reads as the first segment's value.
            for k, a, _, new in changes:
                if k is None:
                    original = first_state["background"]
                else:
                    original = first_state["objects"][k].get(a) if k < len(first_state["objects"]) else None
                if original is not None and original != new and shows(t, k, a, original):
                    resets += 1
                    break
    chunks_to_follow = next((c for c in sorted(per_chunk) if np.mean(per_chunk[c]) >= FOLLOW_SHARE), None)
    return {
        "segment": s,
        "changed": [f"{'background' if k is None else f'object {k}'} {a}: {old} -> {new}" for k, a, old, new in changes],
        "adherence": _share(hits),
        "chunks_to_follow": chunks_to_follow,
        "abrupt_resets": resets,
    }
