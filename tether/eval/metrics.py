"""tether.eval.metrics: the SPEC §5 video metrics as small functions on arrays.

Frames are uint8 [T, H, W, 3]; features are float [T, D], L2-normalised per
frame (see tether.eval.features). Every function returns plain Python floats
(or lists of them) so results drop straight into JSON.

Stand-ins, because VBench's own models cannot run offline here (SPEC §5):
  - dynamic degree uses OpenCV's DIS optical flow instead of RAFT;
  - motion smoothness uses a DIS-flow half-way warp instead of AMT frame
    interpolation. Absolute numbers are therefore not comparable with
    published VBench scores; relative comparisons between runs are.
"""

import numpy as np

# A frame pair is "dynamic" when its mean flow magnitude exceeds this many
# pixels per frame, measured on a 64-px-high frame (scaled with the height so the
# threshold means the same motion at any resolution). VBench thresholds the top
# 5 % of RAFT magnitudes at ~6 px on 256-px frames; 1 px on 64 px is about that
# rate of motion per frame height.
DYNAMIC_THRESHOLD_PX_AT_64 = 1.0
TOP_SHARE = 0.05  # VBench averages the top 5 % of flow magnitudes per frame pair


def _as_unit(features) -> np.ndarray:
    f = np.asarray(features, dtype=np.float64)
    norms = np.linalg.norm(f, axis=1, keepdims=True)
    return f / np.maximum(norms, 1e-12)


def consistency(features) -> float:
    """VBench subject/background consistency of per-frame features [T, D].

    Mean over t >= 1 of ½(max(0, cos(f_t, f_{t-1})) + max(0, cos(f_t, f_0))).
    1.0 for a static video; a scene cut lowers both terms. A single frame gives 1.0.
    """
    if len(features) < 2:
        return 1.0
    return float(np.mean(consistency_terms(features)[1:]))


def consistency_terms(features) -> np.ndarray:
    """Per frame [T], the term `consistency` averages: ½(max(0, cos(f_t, f_{t-1})) + max(0, cos(f_t, f_0))); NaN at t = 0."""
    f = _as_unit(features)
    out = np.full(len(f), np.nan)
    if len(f) >= 2:
        to_previous = np.maximum(0.0, np.sum(f[1:] * f[:-1], axis=1))
        to_first = np.maximum(0.0, f[1:] @ f[0])
        out[1:] = 0.5 * (to_previous + to_first)
    return out


def temporal_flicker(frames) -> float:
    """VBench temporal flickering: (255 - mean |x_t - x_{t+1}|) / 255, over all pixels and pairs.

    1.0 for a static video. VBench scores it on static-camera clips; on moving
    content it also counts real motion.
    """
    if len(frames) < 2:
        return 1.0
    return float(np.mean(flicker_terms(frames)[1:]))  # every pair has as many pixels: the plain mean is exact


def flicker_terms(frames) -> np.ndarray:
    """Per frame [T], (255 - mean |x_t - x_{t-1}|) / 255 (the pair ending at t); NaN at t = 0."""
    x = np.asarray(frames)
    out = np.full(len(x), np.nan)
    for t in range(1, len(x)):  # pair by pair: a long video would not fit as one int16 array
        out[t] = (255.0 - np.abs(x[t].astype(np.int16) - x[t - 1].astype(np.int16)).mean()) / 255.0
    return out


def _gray(frame) -> np.ndarray:
    import cv2
    return cv2.cvtColor(np.ascontiguousarray(frame), cv2.COLOR_RGB2GRAY)


def _dis():
    import cv2
    # MEDIUM preset: FAST misses small (64-px) frames' motion at the coarsest
    # levels; MEDIUM is still ~1 ms a pair at toy sizes.
    return cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)


def flow_magnitudes(frames, top_share: float = TOP_SHARE) -> np.ndarray:
    """Per consecutive frame pair, [T-1]: mean DIS optical-flow magnitude (px/frame) of its
    fastest `top_share` of pixels (VBench's form: a small moving subject on a still
    background should still count as motion)."""
    x = np.asarray(frames)
    dis = _dis()
    grays = [_gray(f) for f in x]
    out = []
    for t in range(len(x) - 1):
        mags = np.linalg.norm(dis.calc(grays[t], grays[t + 1], None), axis=2).ravel()
        top = max(1, int(round(top_share * mags.size)))
        out.append(float(np.partition(mags, mags.size - top)[-top:].mean()))
    return np.array(out)


def dynamic_degree(frames, threshold_px_at_64: float = DYNAMIC_THRESHOLD_PX_AT_64) -> dict:
    """Dynamic degree from DIS flow (RAFT stand-in).

    Returns {"mean_flow": mean over pairs of the top-5 % flow magnitude in px/frame
    (flow_magnitudes), "dynamic_fraction": share of frame pairs whose magnitude exceeds `threshold_px_at_64` * H / 64}.
    Static video -> 0 and 0.
    """
    x = np.asarray(frames)
    if len(x) < 2:
        return {"mean_flow": 0.0, "dynamic_fraction": 0.0}
    mags = flow_magnitudes(x)
    threshold = threshold_px_at_64 * x.shape[1] / 64.0
    return {"mean_flow": float(mags.mean()), "dynamic_fraction": float((mags > threshold).mean())}


def _warp(image, flow, fraction: float):
    """Backward-warp `image` by `fraction` of `flow` (bilinear, border replicated)."""
    import cv2
    h, w = flow.shape[:2]
    grid_x, grid_y = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    map_x = grid_x + fraction * flow[..., 0]
    map_y = grid_y + fraction * flow[..., 1]
    return cv2.remap(image, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def motion_smoothness(frames) -> float:
    """Frame-interpolation smoothness, a flow-based stand-in for VBench's AMT.

    For each t in 1..T-2, interpolate frame t from its neighbours alone (as a
    frame interpolator would): DIS flow between frames t-1 and t+1, each
    neighbour backward-warped half-way along it, the two predictions averaged.
    Score = (255 - mean |prediction - x_t|) / 255, averaged over t: 1.0 for a
    static video or motion linear enough for the flow to capture; jerky or
    flickering motion lowers it.
    """
    x = np.asarray(frames)
    if len(x) < 3:
        return 1.0
    dis = _dis()
    scores = []
    for t in range(1, len(x) - 1):
        g_prev, g_next = _gray(x[t - 1]), _gray(x[t + 1])
        # Flow between the two neighbours, halved: what a frame interpolator sees
        # (it never gets frame t). Backward warps land both on the midpoint.
        forward = dis.calc(g_prev, g_next, None)
        backward = dis.calc(g_next, g_prev, None)
        from_prev = _warp(x[t - 1], backward, 0.5)
        from_next = _warp(x[t + 1], forward, 0.5)
        prediction = 0.5 * (from_prev.astype(np.float32) + from_next.astype(np.float32))
        scores.append((255.0 - np.abs(prediction - x[t].astype(np.float32)).mean()) / 255.0)
    return float(np.mean(scores))


def similarity_sample_frames(num_frames: int, fps: float, step_seconds: float = 10.0,
                             half_window_seconds: float = 0.5) -> dict:
    """{t seconds: frame indices within ±half_window of t} for t = step, 2·step, ... inside the video.

    Context Forcing's long-range probe: frames near 10 s, 20 s, ... compared with frame 0.
    """
    out = {}
    t = step_seconds
    while t * fps < num_frames:
        lo = max(0, int(np.ceil((t - half_window_seconds) * fps - 1e-9)))
        hi = min(num_frames - 1, int(np.floor((t + half_window_seconds) * fps + 1e-9)))
        out[t] = list(range(lo, hi + 1))
        t += step_seconds
    return out


def similarity_to_first(features, fps: float, step_seconds: float = 10.0) -> dict:
    """Context Forcing's similarity to frame 0: {"10s": mean cos(f_0, f_i) for i within ±0.5 s of 10 s, ...}."""
    f = _as_unit(features)
    return {f"{t:g}s": float(np.mean(f[idx] @ f[0]))
            for t, idx in similarity_sample_frames(len(f), fps, step_seconds).items()}


def drift(values: list) -> float | None:
    """Last minus first of a per-segment metric (None with fewer than two segments)."""
    values = [v for v in values if v is not None]
    return float(values[-1] - values[0]) if len(values) >= 2 else None


def reset_spikes(features, jump: float = 0.15) -> list:
    """Frames t where the video abruptly returns to frame 0's content (feature form of an "abrupt reset").

    Frame t counts when its similarity to frame 0 rises by more than `jump` in
    one step *and* it is closer to frame 0 than to its own predecessor: content
    snapping back to the start, not gradual drift or an ordinary cut.
    """
    f = _as_unit(features)
    to_first = f @ f[0]
    to_previous = np.r_[1.0, np.sum(f[1:] * f[:-1], axis=1)]
    return [t for t in range(2, len(f))
            if to_first[t] - to_first[t - 1] > jump and to_first[t] > to_previous[t]]
