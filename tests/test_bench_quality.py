"""`tether bench quality` on a tiny suite (random toy weights, episodes cut to 1.5 s), and its pieces."""

import json

import numpy as np
import pytest

from tether.bench import quality
from tether.cli import main

TINY = ["bench", "quality", "--models", "default", "--policies", "window,dual", "--episodes", "reentry-5s,long-60s", "--seeds", "1",
        "--max-seconds", "1.5", "--features", "pixels", "--window", "0.5", "--quiet"]


def test_cli_writes_every_output_and_restarts_from_finished_runs(tmp_path, monkeypatch, capsys, one_thread):
    out = tmp_path / "results"
    assert main(TINY + ["--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "60s block" in printed and "window" in printed and "dual" in printed

    data = json.loads((out / "quality.json").read_text())
    assert data["command"].startswith("tether bench quality") and "--max-seconds 1.5" in data["command"]
    assert data["device"].startswith("cpu") and data["wall_seconds"] > 0
    assert data["runs_generated"] == 4 and data["runs_cached"] == 0 and len(data["runs"]) == 4
    run = data["runs"][0]
    assert run["frames"] == 9 + 12  # 1.5 s = 2 chunks
    assert {"adherence", "identity_retention", "background_stability", "switch_adherence", "chunks_to_follow",
            "abrupt_resets", "subject_consistency", "background_consistency", "temporal_flicker"} <= set(run["metrics"])
    assert "series" in run["evaluation"] and "toy" in run["evaluation"]
    window = data["aggregates"]["window"]
    assert set(window["blocks"]) == {"60s"} and window["blocks"]["60s"]["runs"] == 2
    # cut to 1.5 s, the subject never leaves, let alone comes back: nothing retained, context "<5 s"
    assert window["reentry_identity"] == {"5": 0.0}
    assert window["effective_context_seconds"] == 0.0 and window["effective_context"] == "<5 s"

    md = (out / "quality.md").read_text()
    assert "| window |" in md and "| dual |" in md and "60s block" in md and "eff. context" in md
    assert "240s block" not in md  # no 240 s episode in this suite
    pngs = sorted(p.name for p in out.glob("quality_*.png"))
    assert "quality_60s_temporal_flicker.png" in pngs and "quality_reentry.png" in pngs
    page = (out / "quality.html").read_text()
    assert page.count("data:image/png;base64,") >= len(pngs) + 2  # every plot and a frame strip per row
    assert "src='http" not in page and 'src="http' not in page  # self-contained
    assert len(list((out / "quality_runs").glob("*.json"))) == 4
    assert not list((out / "quality_runs").glob("*.mp4"))  # videos are scored, then dropped

    # A rerun trusts the finished runs: nothing is loaded or generated.
    def no_model(*_args, **_kwargs):
        raise AssertionError("a cached run was generated again")

    monkeypatch.setattr(quality, "load_model", no_model)
    assert main(TINY + ["--out", str(out)]) == 0
    again = json.loads((out / "quality.json").read_text())
    assert again["runs_generated"] == 0 and again["runs_cached"] == 4
    assert again["aggregates"] == data["aggregates"]

    # A run killed before it finished left no result: only that one is made again.
    monkeypatch.undo()
    (out / "quality_runs" / "default__dual__long-60s__seed0.json").unlink()
    assert main(TINY + ["--out", str(out)]) == 0
    third = json.loads((out / "quality.json").read_text())
    assert third["runs_generated"] == 1 and third["runs_cached"] == 3


@pytest.mark.parametrize("option, value, word", [("--policies", "window,nope", "nope"),
                                                 ("--episodes", "reentry-7s", "reentry-7s"),
                                                 ("--models", "no-such-model", "no-such-model")])
def test_bad_names_are_one_line_errors(tmp_path, capsys, option, value, word):
    assert main(["bench", "quality", option, value, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tether: error:") and "\n" not in err and word in err
    assert not (tmp_path / "o").exists()  # checked before anything is written


def test_effective_context_length():
    ecl = quality.effective_context_length
    assert ecl({5.0: 0.97, 10.0: 0.93, 20.0: 0.85, 40.0: 0.95}) == 10.0  # must hold at every gap up to it
    assert ecl({5.0: 0.95, 10.0: 0.92, 20.0: 0.91, 40.0: 0.90}) == 40.0
    assert ecl({5.0: 0.89, 10.0: 0.99}) == 0.0
    assert ecl({5.0: 0.95, 10.0: None}) == 5.0  # never seen again: not retained
    fmt = quality.format_context_length
    assert fmt(0.0, [5.0, 10.0]) == "<5 s" and fmt(10.0, [5.0, 10.0, 20.0]) == "10 s"
    assert fmt(20.0, [5.0, 10.0, 20.0]) == "≥20 s"


def test_aggregate_from_hand_made_runs():
    def record(episode, seed, identity, adherence):
        metrics = {key: None for key, _, _ in quality.METRICS}
        metrics.update(adherence=adherence, switches=0, switches_followed=0, reentry_identity=identity)
        return {"label": "window", "model": "default", "policy": "window", "episode": episode, "seed": seed,
                "block": quality.block_of(episode), "frames": 100, "metrics": metrics, "evaluation": {}}

    records = [record("reentry-5s", 0, 1.0, 0.5), record("reentry-5s", 1, 0.9, 0.7),
               record("reentry-10s", 0, 0.95, 0.6), record("reentry-10s", 1, 0.8, None),  # mean 0.875 < 0.9
               record("reentry-20s", 0, 1.0, 0.6), record("long-240s", 0, None, 0.2)]
    rows = quality.rows_for(["default"], ["window"])
    a = quality.aggregate(records, rows)["window"]
    assert a["reentry_identity"] == {"5": pytest.approx(0.95), "10": pytest.approx(0.875), "20": 1.0}
    assert a["effective_context_seconds"] == 5.0 and a["effective_context"] == "5 s"
    assert a["blocks"]["60s"]["adherence"] == pytest.approx(0.6) and a["blocks"]["60s"]["runs"] == 5
    assert a["blocks"]["240s"]["adherence"] == pytest.approx(0.2)


def test_rows_students_run_their_own_policy():
    rows = quality.rows_for(["default", "context-forcing", "grounded-forcing"], ["window", "full"])
    assert [(r["label"], r["policy"]) for r in rows] == [
        ("window", "window"), ("full", "full"), ("context-forcing (slow-fast)", "slow-fast"),
        ("grounded-forcing (dual)", "dual")]


def test_a_bundle_folder_that_names_its_policy_is_a_student(tmp_path):
    student, general = tmp_path / "my-student", tmp_path / "my-model"
    for folder, meta in ((student, {"policy": "dual"}), (general, {})):
        folder.mkdir()
        (folder / "pipeline.json").write_text(json.dumps(meta))
    rows = quality.rows_for([str(student), str(general)], ["window", "full"])
    assert [(r["label"], r["policy"]) for r in rows] == [
        ("my-student (dual)", "dual"), ("my-model / window", "window"), ("my-model / full", "full")]


def test_episodes_cut_to_a_length():
    from tether.world.episodes import episode

    segments = episode("reentry-5s", 0).segments  # 3 s + 5 s + 6 s
    cut = quality.truncated_segments(segments, 4.0)
    assert [s.seconds for s in cut] == [3.0, 1.0] and cut[1].prompt == segments[1].prompt
    assert quality.truncated_segments(segments, None) == list(segments)


def test_window_means_and_subject_box():
    from tether.eval.regions import split_frames
    from tether.eval.series import drift, window_means

    series = window_means({"a": [np.nan, 1.0, 0.0, 1.0, np.nan, np.nan]}, 6, fps=2, window_seconds=1)
    assert series["t"] == [0.0, 1.0, 2.0] and series["a"] == [1.0, 0.5, None]
    assert drift(series["a"]) == -0.5

    frames = np.zeros((2, 64, 64, 3), np.uint8)
    frames[:, 30:34, 60:64] = 255  # a subject at the right edge
    seen = {"present": True, "x": 62.0, "y": 32.0, "score": 0.9}
    readings = [{"objects": [seen]}, {"objects": [{"present": False, "score": 0.0}]}]
    indices, crops, backgrounds = split_frames(frames, readings)
    assert indices.tolist() == [0] and crops.shape == (1, 24, 24, 3)  # the box is clamped inside the frame
    assert crops[0].max() == 255 and backgrounds[0].max() == 0 and backgrounds[1].max() == 255


def test_fingerprint_follows_the_weights_of_an_adapter_and_of_its_base(tmp_path):
    """A cached run is reused only for the same weights: a retrained adapter, or the same adapter over
    a new base, must miss the cache; the same bytes in another folder (a fresh clone) must hit it."""
    import shutil

    from tether.pipeline import WEIGHTS

    def bundle(name, base_bytes=b"base", adapter_bytes=b"adapter"):
        base, student = tmp_path / name / "default", tmp_path / name / "student"
        (base / "vae").mkdir(parents=True)
        (base / "pipeline.json").write_text(json.dumps({"height": 64, "width": 64}))
        (base / "transformer.safetensors").write_bytes(base_bytes)
        (student / "adapter").mkdir(parents=True)
        (student / "pipeline.json").write_text(json.dumps({"base": "../default", "lora": "adapter"}))
        (student / "adapter" / "adapter_model.safetensors").write_bytes(adapter_bytes)
        return quality.model_fingerprint(str(student))

    reference = bundle("a")
    assert bundle("b") == reference  # same bytes, other folder, other mtimes
    assert bundle("c", adapter_bytes=b"retrained") != reference
    assert bundle("d", base_bytes=b"new base") != reference
    shutil.copytree(WEIGHTS / "default", tmp_path / "copy")
    assert quality.model_fingerprint(str(tmp_path / "copy")) == quality.model_fingerprint("default")
