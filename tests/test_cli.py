"""End-to-end runs of the `tether` command, as a user types it."""

import subprocess
import sys

import pytest

from tether.video import probe_video


def tether(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "tether", *args], capture_output=True, text=True, timeout=timeout)


def test_generate_end_to_end_with_a_switch(tmp_path):
    out = tmp_path / "video.mp4"
    result = tether("generate", "--timeline", "a red circle bounces on grass[1.5s] | a red circle rests on snow[1s#]",
                    "--seed", "1", "--quiet", "-o", str(out))
    assert result.returncode == 0, result.stderr
    frames, fps, width, height = probe_video(str(out))
    # 2 + 1 chunks: 9 frames for the first chunk (1 + 4 + 4), 12 for each later one
    assert frames == 9 + 12 + 12
    assert fps == 16
    assert "wrote" in result.stdout


def test_generate_saves_a_frame_strip(tmp_path):
    import matplotlib.image

    strip = tmp_path / "strip.png"
    result = tether("generate", "--prompt", "a red circle bounces on grass", "--seconds", "2.25", "--strip", str(strip),
                    "--strip-every", "1", "--quiet", "-o", str(tmp_path / "v.mp4"))
    assert result.returncode == 0, result.stderr
    image = matplotlib.image.imread(strip)
    # 33 frames at 16 fps: frames 0, 16 and 32, each 64 px wide, with 2 px gaps
    assert image.shape[:2] == (64, 3 * 64 + 2 * 2)


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--timeline", "a[10s | b"], "timeline"),
        (["--prompt", "x", "--seconds", "0"], "positive"),
        (["--prompt", "x", "--seconds", "-2"], "positive"),
        (["--prompt", "x", "--policy", "nope"], "unknown policy"),
        (["--prompt", "x", "--timeline", "y"], "not allowed"),
        (["--timeline", "/no/such/file.yaml"], "not found"),
        (["--prompt", "x", "--checkpoint", "/no/such/ckpt.pt"], "not found"),
        (["--prompt", "x", "-o", "/no/such/dir/out.mp4"], "/no/such/dir"),
        (["--prompt", "x", "--switch", "sideways"], "unknown switch"),
        (["--prompt", "x", "--policy", "slow-fast", "--policy-opt", "colour=blue"], "bad options"),
        (["--prompt", "x", "--policy-opt", "novalue"], "KEY=VALUE"),
        (["--prompt", "x", "--strip", "/no/such/dir/s.png"], "/no/such/dir"),
        (["--prompt", "x", "--strip", "s.png", "--strip-every", "0"], "positive"),
    ],
)
def test_bad_input_is_one_line_and_nonzero(tmp_path, args, fragment):
    if "-o" not in args:
        args = args + ["-o", str(tmp_path / "o.mp4")]
    result = tether("generate", *args)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert fragment in lines[0]


@pytest.mark.parametrize("policy", ["frame-sink", "infinity-rope", "rolling", "slow-fast", "dual"])
def test_every_policy_runs_from_the_cli(tmp_path, policy):
    out = tmp_path / f"{policy}.mp4"
    extra = ["--policy-opt", "promotion=code"] if policy == "slow-fast" else []
    result = tether("generate", "--timeline", "a red circle bounces on grass[2c] | a blue square rests on snow[2c#]",
                    "--policy", policy, *extra, "--quiet", "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert probe_video(str(out))[0] == 9 + 3 * 12


def test_incompatible_checkpoint_is_one_line(tmp_path):
    bad = tmp_path / "bad.pt"
    import torch

    torch.save({"generator": {"model.nonsense.weight": torch.zeros(2)}}, bad)
    result = tether("generate", "--prompt", "x", "--checkpoint", str(bad), "--base", str(tmp_path), "-o", str(tmp_path / "o.mp4"))
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr


def test_train_overrides_may_follow_the_options(tmp_path):
    result = tether("train", "teacher", "--out", str(tmp_path / "run"), "--quiet", "--device", "cpu",
                    "model.source=tiny", "data.frames=3", "data.height=4", "data.width=4", "batch_size=1", "steps=1")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "run" / "log.jsonl").exists()
    bad = tether("train", "teacher", "--out", str(tmp_path / "run2"), "--bogus")
    assert bad.returncode == 2 and "unrecognized arguments: --bogus" in bad.stderr
