"""Prompt timelines: which prompt holds for which chunks.

Inline syntax: `"a red fox runs[10s] | the fox stops[5s#]"` — segments split
by `|`, each with a duration in seconds (or chunks: `[4c]`), and `#` marking
a scene cut at the segment's start. A segment without a duration takes the
rest of `--seconds`. The same content can come from a YAML/JSON file:

    segments:
      - {prompt: "a red fox runs", seconds: 10}
      - {prompt: "the fox stops", seconds: 5, cut: true}

Switches happen at chunk boundaries: seconds convert to chunks as
sec * fps / frames_per_chunk (16 / 12 for Wan), rounded, at least one.
"""

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import TetherError

FPS = 16
FRAMES_PER_CHUNK = 12  # 3 latent frames * 4 pixel frames


@dataclass(frozen=True)
class Segment:
    prompt: str
    chunks: int
    cut: bool = False


@dataclass(frozen=True)
class Timeline:
    segments: tuple

    @property
    def num_chunks(self) -> int:
        return sum(s.chunks for s in self.segments)

    def segment_at(self, chunk: int) -> tuple:
        """(segment index, segment) holding chunk `chunk`."""
        start = 0
        for i, s in enumerate(self.segments):
            if chunk < start + s.chunks:
                return i, s
            start += s.chunks
        raise IndexError(chunk)

    def starts(self) -> list:
        """First chunk of each segment."""
        out, start = [], 0
        for s in self.segments:
            out.append(start)
            start += s.chunks
        return out

    def to_string(self) -> str:
        return " | ".join(f"{s.prompt}[{s.chunks}c{'#' if s.cut else ''}]" for s in self.segments)


def seconds_to_chunks(seconds: float) -> int:
    if not math.isfinite(seconds) or seconds <= 0:
        raise TetherError(f"length must be positive, got {seconds:g} s")
    return max(1, round(seconds * FPS / FRAMES_PER_CHUNK))


_SEGMENT = re.compile(r"^(?P<prompt>[^\[\]]*?)\s*(\[\s*(?P<amount>[-+0-9.eE]+)\s*(?P<unit>s|c)?\s*(?P<cut>#)?\s*\])?\s*$")


def _check_prompt(prompt: str, where: str) -> str:
    prompt = prompt.strip()
    if not prompt:
        raise TetherError(f"empty prompt in {where}")
    return prompt


def _finish(raw: list, total_seconds, source: str) -> Timeline:
    """raw: (prompt, chunks or None, cut). One open-ended segment takes the remaining length."""
    open_ended = [i for i, r in enumerate(raw) if r[1] is None]
    if len(open_ended) > 1:
        raise TetherError(f"{source}: only one segment may omit its length")
    if open_ended:
        if total_seconds is None:
            if len(raw) > 1:
                raise TetherError(f"{source}: a segment has no length and no --seconds was given")
            total_seconds = 5.0
        known = sum(r[1] for r in raw if r[1] is not None)
        rest = seconds_to_chunks(total_seconds) - known
        if rest < 1:
            raise TetherError(f"{source}: --seconds {total_seconds:g} leaves no time for the open segment")
        i = open_ended[0]
        raw[i] = (raw[i][0], rest, raw[i][2])
    return Timeline(tuple(Segment(p, n, c) for p, n, c in raw))


def parse_timeline(spec: str, total_seconds: float | None = None) -> Timeline:
    """Parse the inline syntax. A plain prompt is a one-segment timeline."""
    if not spec or not spec.strip():
        raise TetherError("empty timeline")
    raw = []
    for n, part in enumerate(spec.split("|"), start=1):
        m = _SEGMENT.match(part.strip())
        if m is None:
            raise TetherError(f"cannot parse timeline segment {n}: '{part.strip()}' (expected 'prompt[10s]' or 'prompt[10s#]')")
        prompt = _check_prompt(m["prompt"], f"timeline segment {n}")
        chunks = None
        if m["amount"] is not None:
            try:
                amount = float(m["amount"])
            except ValueError:
                raise TetherError(f"bad length '{m['amount']}' in timeline segment {n}") from None
            if m["unit"] == "c":
                if amount <= 0 or amount != int(amount):
                    raise TetherError(f"chunk count must be a positive integer in timeline segment {n}")
                chunks = int(amount)
            else:
                chunks = seconds_to_chunks(amount)
        raw.append((prompt, chunks, m["cut"] is not None))
    return _finish(raw, total_seconds, "timeline")


def load_timeline_file(path: str, total_seconds: float | None = None) -> Timeline:
    p = Path(path)
    if not p.is_file():
        raise TetherError(f"timeline file not found: {path}")
    text = p.read_text()
    try:
        if p.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as e:
        raise TetherError(f"cannot read timeline file {path}: {str(e).splitlines()[0]}") from None
    segments = data.get("segments") if isinstance(data, dict) else data
    if not isinstance(segments, list) or not segments:
        raise TetherError(f"timeline file {path} must hold a non-empty list 'segments'")
    raw = []
    for n, seg in enumerate(segments, start=1):
        if not isinstance(seg, dict) or "prompt" not in seg:
            raise TetherError(f"timeline file {path}: segment {n} needs a 'prompt'")
        prompt = _check_prompt(str(seg["prompt"]), f"segment {n} of {path}")
        if "chunks" in seg:
            chunks = seg["chunks"]
            if not isinstance(chunks, int) or chunks <= 0:
                raise TetherError(f"timeline file {path}: segment {n} 'chunks' must be a positive integer")
        elif "seconds" in seg:
            try:
                chunks = seconds_to_chunks(float(seg["seconds"]))
            except (TypeError, ValueError):
                raise TetherError(f"timeline file {path}: segment {n} has a bad 'seconds'") from None
        else:
            chunks = None
        raw.append((prompt, chunks, bool(seg.get("cut", False))))
    return _finish(raw, total_seconds, str(path))


def resolve_timeline(prompt: str | None = None, timeline: str | None = None, seconds: float | None = None) -> Timeline:
    """The CLI's rule: --prompt or --timeline (inline or a file path), and --seconds."""
    if (prompt is None) == (timeline is None):
        raise TetherError("give exactly one of --prompt or --timeline")
    if seconds is not None:
        seconds_to_chunks(seconds)  # validates
    if prompt is not None:
        prompt = _check_prompt(prompt, "--prompt")
        return Timeline((Segment(prompt, seconds_to_chunks(seconds if seconds is not None else 5.0)),))
    if Path(timeline).suffix.lower() in (".yaml", ".yml", ".json"):
        return load_timeline_file(timeline, seconds)
    return parse_timeline(timeline, seconds)
