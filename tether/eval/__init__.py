"""tether.eval: score generated videos (`tether eval VIDEO... --json OUT`).

    from tether.eval import evaluate
    result = evaluate("out.mp4", prompt="a red circle bounces on grass")

Generic metrics (any video; SPEC §5, see tether.eval.metrics): consistency of
per-frame features, temporal flicker, dynamic degree and motion smoothness
(DIS-flow stand-ins for RAFT / AMT), Context Forcing's similarity to frame 0
at 10 s steps, CLIP-T with a CLIP/SigLIP feature model, and per-segment values
with their drift (last segment minus first). Segments are the timeline's
(chunk 0 = 9 frames, later chunks 12), or 10 s windows without a timeline.

Toy-world metrics (tether.eval.toy) are added when every prompt parses with the
toy world's grammar: exact adherence, identity retention, background
stability, switch-following and abrupt resets, read with the shipped probe.
"""

from pathlib import Path

import numpy as np

from tether.errors import TetherError

from . import metrics

WINDOW_SECONDS = 10.0
PROBE_PATH = Path(__file__).resolve().parent.parent / "weights" / "probe"
GENERIC_PER_SEGMENT = ("consistency", "temporal_flicker", "mean_flow", "motion_smoothness")


def chunk_first_frame(chunk: int) -> int:
    """First frame of a chunk: chunk 0 holds 9 frames, every later chunk 12."""
    return 0 if chunk == 0 else 9 + 12 * (chunk - 1)


def world_ranges(timeline_text: str, num_frames: int):
    """Segment ranges of a toy-world render (tether.world.render_clip), or None.

    A world render holds round(seconds * 16) frames per segment, not whole
    chunks; when the video's length is exactly that total (and `timeline_text`
    is an inline world timeline), its boundaries are the true ones.
    """
    from tether.world.prompts import parse_timeline as parse_world
    try:
        segments = parse_world(timeline_text)
    except Exception:
        return None
    if sum(s.frames for s in segments) != num_frames:
        return None
    out, first = [], 0
    for s in segments:
        out.append((s.prompt, first, first + s.frames))
        first += s.frames
    return out


def segment_ranges(num_frames: int, fps: float, timeline=None, prompt=None) -> list:
    """[(prompt or None, first frame, end frame)] covering the video.

    With a timeline (a Timeline, or its text): its segments' chunk ranges, the
    last stretched or cut to the video's end (a video may stop early); for a
    timeline text matching a toy-world render's length, the render's own
    ranges (world_ranges). With one prompt: the whole video. Otherwise 10 s windows.
    """
    if isinstance(timeline, str):
        from tether.timeline import resolve_timeline
        chunked = resolve_timeline(timeline=timeline)
        total = chunk_first_frame(chunked.num_chunks)
        world = world_ranges(timeline, num_frames) if total != num_frames else None
        if world is not None:
            return world
        timeline = chunked
    if timeline is not None:
        out = []
        for segment, start in zip(timeline.segments, timeline.starts()):
            first = chunk_first_frame(start)
            if first >= num_frames:
                break
            out.append([segment.prompt, first, min(num_frames, chunk_first_frame(start + segment.chunks))])
        out[-1][2] = num_frames
        return [tuple(r) for r in out]
    if prompt is not None:
        return [(prompt, 0, num_frames)]
    window = max(1, int(round(WINDOW_SECONDS * (fps or 16.0))))
    return [(None, s, min(num_frames, s + window)) for s in range(0, num_frames, window)]


def _generic(frames, features) -> dict:
    dynamic = metrics.dynamic_degree(frames)
    return {
        "consistency": metrics.consistency(features),
        "temporal_flicker": metrics.temporal_flicker(frames),
        "mean_flow": dynamic["mean_flow"],
        "dynamic_fraction": dynamic["dynamic_fraction"],
        "motion_smoothness": metrics.motion_smoothness(frames),
    }


def evaluate(video_path, timeline=None, features="efficientnet-lite0", prompt=None, *, extractor=None,
             probe=None, regions=False, series_seconds=None) -> dict:
    """All metrics of one video as a JSON-ready dict.

    `timeline`: a tether.timeline.Timeline, its text (see segment_ranges), or None; `prompt`: one prompt for the
    whole video (instead of a timeline). `features`: an extractor name or model
    folder (tether.eval.features); pass a loaded `extractor` / `probe` to reuse
    them across videos. `regions`: for toy-world videos, also subject and
    background consistency on separate pixels (tether.eval.regions).
    `series_seconds`: also every per-frame metric as means over windows of
    that length ("series", tether.eval.series).
    """
    from tether.video import probe_video, read_video

    path = Path(video_path)
    if not path.is_file():
        raise TetherError(f"no video file at {path}")
    try:
        _, fps, width, height = probe_video(path)
        frames = read_video(path)
    except TetherError:
        raise
    except Exception as e:  # PyAV's errors for files that are not video
        raise TetherError(f"cannot read video {path}: {e}") from None
    if len(frames) < 2:
        raise TetherError(f"{path} has {len(frames)} frame(s); evaluation needs at least 2")
    fps = fps or 16.0
    if extractor is None:
        from .features import load_extractor
        extractor = load_extractor(features)
    feats = extractor.frames(frames)

    ranges = segment_ranges(len(frames), fps, timeline, prompt)
    result = {
        "video": str(path), "frames": int(len(frames)), "fps": fps, "size": [int(width), int(height)],
        "features": extractor.name,
        **_generic(frames, feats),
        "similarity_to_first": metrics.similarity_to_first(feats, fps),
        "reset_spikes": metrics.reset_spikes(feats),
    }
    segments = []
    for seg_prompt, first, end in ranges:
        entry = {"prompt": seg_prompt, "frames": [first, end], **_generic(frames[first:end], feats[first:end])}
        if extractor.has_text and seg_prompt:
            entry["clip_t"] = float(np.mean(feats[first:end] @ extractor.text(seg_prompt)))
        segments.append(entry)
    result["segments"] = segments
    if extractor.has_text and any(s.get("clip_t") is not None for s in segments):
        result["clip_t"] = float(np.mean([s["clip_t"] for s in segments if "clip_t" in s]))
    result["drift"] = {name: metrics.drift([s[name] for s in segments]) for name in GENERIC_PER_SEGMENT}

    per_frame = {"consistency": metrics.consistency_terms(feats), "temporal_flicker": metrics.flicker_terms(frames)}
    prompts = [p for p, _, _ in ranges]
    if all(prompts):
        from .toy import frame_scores, parse_world_timeline, toy_metrics
        parsed = parse_world_timeline(prompts)
        if parsed is not None:
            if probe is None:
                from tether.world.probe import load_probe
                probe = load_probe(str(PROBE_PATH))
            readings = probe.read(frames)
            segment_frames = [(f, e) for _, f, e in ranges]
            result["toy"] = toy_metrics(readings, parsed, segment_frames)
            if regions:
                from .regions import subject_background
                split = subject_background(frames, readings, extractor)
                per_frame["subject_consistency"] = split.pop("subject_terms")
                per_frame["background_consistency"] = split.pop("background_terms")
                result.update(split)
            if series_seconds:
                scores = frame_scores(readings, parsed, segment_frames)
                for name, key in (("adherence", "adherence"), ("identity_retention", "identity"),
                                  ("background_stability", "background")):
                    per_frame[name] = [np.nan if s is None or s[key] is None else s[key] for s in scores]
    if series_seconds:
        from .series import window_means
        result["series"] = window_means(per_frame, len(frames), fps, series_seconds)
    return result


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def format_table(result: dict) -> str:
    """A few readable lines for the terminal (the JSON holds everything)."""
    lines = [f"{result['video']}: {result['frames']} frames at {result['fps']:g} fps, features {result['features']}"]
    names = ["consistency", "temporal_flicker", "mean_flow", "dynamic_fraction", "motion_smoothness"]
    if "clip_t" in result:
        names.append("clip_t")
    lines.append("  " + "  ".join(f"{n:>17}" for n in ["segment"] + names))
    lines.append("  " + "  ".join(f"{v:>17}" for v in ["all"] + [_fmt(result.get(n)) for n in names]))
    for i, seg in enumerate(result["segments"]):
        label = f"{i} [{seg['frames'][0]}-{seg['frames'][1]})"
        lines.append("  " + "  ".join(f"{v:>17}" for v in [label] + [_fmt(seg.get(n)) for n in names]))
    lines.append("  drift (last - first): " + ", ".join(f"{k} {_fmt(v)}" for k, v in result["drift"].items()))
    if result["similarity_to_first"]:
        lines.append("  similarity to frame 0: " + ", ".join(f"{k} {_fmt(v)}"
                                                             for k, v in result["similarity_to_first"].items()))
    toy = result.get("toy")
    if toy:
        lines.append(f"  toy: adherence {_fmt(toy['adherence'])}, identity {_fmt(toy['identity_retention'])}, "
                     f"background {_fmt(toy['background_stability'])}, abrupt resets {toy['abrupt_resets']}")
        for sw in toy["switches"]:
            lines.append(f"    switch to segment {sw['segment']} ({'; '.join(sw['changed']) or 'no read change'}): "
                         f"adherence {_fmt(sw['adherence'])}, follows after {_fmt(sw['chunks_to_follow'])} chunk(s)")
    return "\n".join(lines)


def cmd_eval(args) -> int:
    """`tether eval VIDEO... [--prompt | --timeline] [--features] --json OUT`."""
    import json

    from tether.timeline import resolve_timeline

    from .features import load_extractor

    if args.prompt is not None and args.timeline is not None:
        raise TetherError("give at most one of --prompt or --timeline")
    if args.timeline is not None:
        resolve_timeline(timeline=args.timeline)  # fail early, in one line, on a bad timeline
    if args.prompt is not None:
        resolve_timeline(prompt=args.prompt)  # same checks as generate (empty prompt ...)
    out = Path(args.json)
    if out.parent and not out.parent.is_dir():
        raise TetherError(f"cannot write {out}: no folder {out.parent}")
    for video in args.videos:
        if not Path(video).is_file():
            raise TetherError(f"no video file at {video}")
    extractor = load_extractor(args.features)
    results = []
    for video in args.videos:
        result = evaluate(video, args.timeline, prompt=args.prompt, extractor=extractor)
        print(format_table(result))
        results.append(result)
    out.write_text(json.dumps({"videos": results}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0
