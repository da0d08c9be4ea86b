"""tether.eval.regions: subject and background consistency, split with the probe's subject position.

VBench scores subject consistency with DINO features and background
consistency with CLIP features of the whole frame; both feature models stand
for "what the subject looks like" and "what the scene looks like". On toy-world
videos the probe knows where the subject is, so the two are measured on
separate pixels instead, with one feature extractor (tether.eval.features):

  subject consistency      SPEC §5's consistency formula on a fixed-size box
                           around the subject (SUBJECT_BOX of the frame side,
                           centred on the probe's most confident detection),
                           over the frames where the probe finds it; f_0 is its
                           first such frame.
  background consistency   the same formula on whole frames whose subject box
                           is filled with the frame's median colour (frames
                           without a detection are used as they are).
"""

import numpy as np

from . import metrics

SUBJECT_BOX = 0.375  # side of the subject box, as a share of the frame width (24 px at 64x64)


def subject_centre(reading: dict):
    """(x, y) in frame pixels of the most confident present object, or None."""
    present = [d for d in reading["objects"] if d["present"]]
    if not present:
        return None
    best = max(present, key=lambda d: d["score"])
    return best["x"], best["y"]


def _box(centre, width: int, height: int, side: int):
    x0 = int(round(centre[0] - side / 2))
    y0 = int(round(centre[1] - side / 2))
    return min(max(x0, 0), width - side), min(max(y0, 0), height - side)


def split_frames(frames, readings) -> tuple:
    """(indices of frames with a subject, subject crops uint8 [N, s, s, 3], backgrounds uint8 [T, H, W, 3])."""
    frames = np.asarray(frames)
    height, width = frames.shape[1:3]
    side = max(4, int(round(SUBJECT_BOX * width)))
    side = min(side, width, height)
    indices, crops = [], []
    backgrounds = frames.copy()
    for t, reading in enumerate(readings):
        centre = subject_centre(reading)
        if centre is None:
            continue
        x0, y0 = _box(centre, width, height, side)
        indices.append(t)
        crops.append(frames[t, y0:y0 + side, x0:x0 + side])
        backgrounds[t, y0:y0 + side, x0:x0 + side] = np.median(frames[t].reshape(-1, 3), axis=0).astype(np.uint8)
    crops = np.stack(crops) if crops else np.zeros((0, side, side, 3), np.uint8)
    return np.array(indices, dtype=int), crops, backgrounds


def subject_background(frames, readings, extractor) -> dict:
    """{"subject_consistency", "background_consistency", "subject_frames"} plus per-frame terms
    ("subject_terms", "background_terms": float [T], NaN where nothing is scored) for metrics over time."""
    indices, crops, backgrounds = split_frames(frames, readings)
    subject_terms = np.full(len(frames), np.nan)
    if len(indices) >= 2:
        subject_terms[indices] = metrics.consistency_terms(extractor.frames(crops))
    background_terms = metrics.consistency_terms(extractor.frames(backgrounds))
    return {
        "subject_consistency": _mean(subject_terms),
        "background_consistency": _mean(background_terms),
        "subject_frames": int(len(indices)),
        "subject_terms": subject_terms,
        "background_terms": background_terms,
    }


def _mean(values):
    values = np.asarray(values, dtype=float)
    values = values[~np.isnan(values)]
    return float(values.mean()) if len(values) else None
