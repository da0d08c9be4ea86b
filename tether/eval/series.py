"""tether.eval.series: metrics over time, as means over fixed windows.

`window_means(values, fps, window_seconds)` turns per-frame values (NaN where
a frame has nothing to score) into one value per window of the video: what
`tether bench quality` plots, one line per memory policy. A window where no
frame is scored gives None.
"""

import math

import numpy as np


def window_means(per_frame: dict, num_frames: int, fps: float, window_seconds: float) -> dict:
    """{"t": [window start seconds], name: [mean of the window's non-NaN values or None]} for every name."""
    size = max(1, int(round(window_seconds * fps)))
    starts = list(range(0, num_frames, size))
    out = {"window_seconds": window_seconds, "t": [s / fps for s in starts]}
    for name, values in per_frame.items():
        values = np.asarray(values, dtype=float)
        column = []
        for s in starts:
            part = values[s:s + size]
            part = part[~np.isnan(part)]
            column.append(float(part.mean()) if len(part) else None)
        out[name] = column
    return out


def drift(column: list):
    """Last scored window minus the first (None with fewer than two scored windows)."""
    scored = [v for v in column if v is not None and not math.isnan(v)]
    return float(scored[-1] - scored[0]) if len(scored) >= 2 else None
