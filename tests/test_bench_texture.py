"""`tether bench texture`: the gain is right on known signals, and the command runs end to end."""

import json

import numpy as np
import pytest

from tether.bench.texture import texture_gain
from tether.errors import TetherError
from tether.world import render_clip
from tether.world.render import pattern_scale

from test_cli import tether


def _stripes(period, frames=3, size=32):
    ys, xs = np.mgrid[0:size, 0:size] + 0.5
    wave = np.sin(2 * np.pi * (xs + ys) / period)
    return np.repeat(wave[None, :, :, None], 3, axis=-1).repeat(frames, axis=0).astype(np.float32)


def test_texture_gain_reads_kept_halved_and_flattened_patterns():
    stripes = _stripes(5.0)
    assert np.isclose(texture_gain(stripes, stripes, "striped", 5.0), 1.0)
    assert np.isclose(texture_gain(stripes, 0.5 * stripes, "striped", 5.0), 0.5)
    flat = np.full_like(stripes, stripes.mean())  # the pattern painted as its mean shade
    assert abs(texture_gain(stripes, flat, "striped", 5.0)) < 0.05
    assert abs(texture_gain(stripes, -stripes, "striped", 5.0) + 1.0) < 1e-6  # drawn in opposite phase


def test_pattern_scale_renders_coarser_patterns_only_inside_its_block():
    prompt = "a large red striped square rests on grass"
    plain, _ = render_clip(prompt, 3, seed=0)
    with pattern_scale(2.0):
        coarse, _ = render_clip(prompt, 3, seed=0)
    again, _ = render_clip(prompt, 3, seed=0)
    assert (plain != coarse).any() and (plain == again).all()
    solid = "a large red solid square rests on grass"
    with pattern_scale(2.0):
        assert (render_clip(solid, 3, seed=0)[0] == render_clip(solid, 3, seed=0)[0]).all()
    with pytest.raises(TetherError, match="positive"):
        with pattern_scale(0):
            pass


def test_cli_reports_what_the_built_in_vae_keeps(tmp_path):
    out = tmp_path / "texture.json"
    result = tether("bench", "texture", "--seeds", "1", "--prompts", "1", "--scales", "1,3", "--threads", "1", "--quiet", "--json", str(out))
    assert result.returncode == 0, result.stderr
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 8 and {r["period_px"] for r in rows} == {5.0, 15.0, 4.0, 12.0}
    for row in rows:
        assert -0.2 <= row["texture_gain"] <= 1.2 and 0 <= row["fill_gain"] <= 1.2
    # Coarser patterns survive the round trip better than the world's own.
    gain = {(r["pattern"], r["scale"], r["size"]): r["texture_gain"] for r in rows}
    assert all(gain[(p, 3.0, z)] > gain[(p, 1.0, z)] + 0.2 for p in ("striped", "dotted") for z in ("small", "large"))
    refused = tether("bench", "texture", "--scales", "0")
    assert refused.returncode != 0 and "positive" in refused.stderr and "Traceback" not in refused.stderr
