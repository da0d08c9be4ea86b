"""`tether bench adherence`: the scoring is right on ground truth, and the command runs end to end."""

import json

import numpy as np

from tether.bench.adherence import ATTRIBUTES, random_prompts, score_clip, summarise
from tether.eval import PROBE_PATH
from tether.world import render_clip
from tether.world.probe import load_probe

from test_cli import tether


def test_rendered_ground_truth_scores_near_perfect(one_thread):
    # The world's own renders of the prompts are what a perfect model would make.
    probe = load_probe(str(PROBE_PATH))
    clips = []
    for index, prompt in enumerate(random_prompts(6, seed=3)):
        frames, _ = render_clip(prompt, 33, seed=index)
        clips.append(score_clip(probe, prompt, frames))
    summary = summarise(clips)
    for attribute in ATTRIBUTES:
        mean = summary["adherence"][attribute]["mean"]
        assert mean is None or mean >= 0.9, (attribute, summary["adherence"])
    assert summary["adherence"]["background"]["clips"] == 5  # one prompt leaves the background open
    assert summary["identity"]["size"]["mean"] == 1.0


def test_a_wrong_video_scores_low(one_thread):
    probe = load_probe(str(PROBE_PATH))
    frames, _ = render_clip("a red solid circle bounces on grass", 17, seed=0)
    score = score_clip(probe, "a blue striped square bounces in the snow", frames)
    assert score["adherence"]["background"] < 0.1
    assert all(value < 0.5 for key, value in score["adherence"].items() if key != "background")


def test_cli_writes_a_report(tmp_path):
    out = tmp_path / "adherence.json"
    result = tether("bench", "adherence", "--clips", "2", "--quiet", "--json", str(out))
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert len(report["student"]["per_clip"]) == 2
    assert set(report["student"]["adherence"]) == set(ATTRIBUTES)
    assert "background" in result.stdout


def test_reference_scores_the_renders_and_their_vae_round_trip(tmp_path):
    out = tmp_path / "reference.json"
    result = tether("bench", "adherence", "--clips", "2", "--no-student", "--reference", "--quiet", "--json", str(out))
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert "student" not in report and set(report) >= {"truth", "vae"}
    # The probe reads the world's own renders (near) perfectly; the round trip is what the VAE leaves of them.
    truth = report["truth"]["adherence"]
    assert report["truth"]["subject_frames"] > 0.5  # the world's renders show their subject most of the time
    assert all(truth[a]["mean"] is None or truth[a]["mean"] >= 0.9 for a in ATTRIBUTES)
    assert [c["prompt"] for c in report["truth"]["per_clip"]] == [c["prompt"] for c in report["vae"]["per_clip"]]
    assert "vae" in result.stdout and "truth" in result.stdout


def test_teacher_from_a_barely_noised_render_scores_as_the_vae_round_trip(tmp_path):
    out = tmp_path / "from.json"
    teacher = "tether/weights/default/teacher.safetensors"
    result = tether("bench", "adherence", "--clips", "2", "--no-student", "--reference", "--teacher", teacher,
                    "--teacher-from", "2,500", "--teacher-steps", "4", "--teacher-shift", "3", "--quiet",
                    "--json", str(out))
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert report["teacher_sampling"]["shift"] == 3.0 and report["teacher_sampling"]["steps"] == 4
    assert set(report) >= {"teacher", "teacher@2", "teacher@500", "vae", "truth"}
    # From t=2 one Euler step of 0.002 is left: the clip is the round trip of the render it started from.
    for near, vae in zip(report["teacher@2"]["per_clip"], report["vae"]["per_clip"]):
        assert set(near["adherence"]) == set(vae["adherence"])
        assert all(abs(near["adherence"][a] - vae["adherence"][a]) <= 0.05 for a in vae["adherence"])
    assert "teacher@500" in result.stdout
    refused = tether("bench", "adherence", "--clips", "1", "--no-student", "--teacher-from", "500", "--quiet")
    assert refused.returncode != 0 and "--teacher-from needs --teacher" in refused.stderr


def test_summary_gives_each_mean_its_standard_error_over_clips():
    def clip(shape):
        return {"adherence": {"background": None, "shape": shape, "colour": None, "pattern": None, "size": None},
                "identity": {}, "scored_frames": 0 if shape is None else 81, "frames": 81}

    summary = summarise([clip(1.0), clip(0.0), clip(0.5), clip(None)])
    shape = summary["adherence"]["shape"]
    assert shape["clips"] == 3 and shape["mean"] == 0.5
    assert np.isclose(shape["stderr"], np.std([1.0, 0.0, 0.5], ddof=1) / np.sqrt(3))
    assert summary["adherence"]["colour"] == {"mean": None, "stderr": None, "clips": 0}
    assert summarise([clip(1.0)])["adherence"]["shape"]["stderr"] is None  # one clip has no spread
    assert summary["subject_frames"] == 0.75 and summary["clips_without_subject"] == 1


def test_teacher_is_sampled_on_the_bundles_grid_unless_told_otherwise(monkeypatch, one_thread):
    """The built-in bundle names the grid its student was distilled from; flags override it."""
    from tether.bench import adherence

    grids = []

    def fake_teacher_clip(pipe, teacher, prompt, seed, steps, shift, guidance, **_):
        grids.append((steps, shift))
        return np.zeros((81, 64, 64, 3), dtype=np.uint8)

    monkeypatch.setattr(adherence, "teacher_clip", fake_teacher_clip)
    teacher = "tether/weights/default/teacher.safetensors"
    sampling = json.loads(open("tether/weights/default/pipeline.json").read())["teacher_sampling"]
    report = adherence.run(None, teacher, clips=1, student=False, progress=False)
    assert grids == [(sampling["steps"], sampling["shift"])]
    assert report["teacher_sampling"]["steps"] == sampling["steps"]
    adherence.run(None, teacher, clips=1, student=False, progress=False, teacher_steps=7, shift=2.0)
    assert grids[-1] == (7, 2.0)


def test_two_colours_shown_names_a_colour_leaking_between_subjects(one_thread):
    from tether.bench.adherence import two_colours_shown
    from tether.world import parse

    def reading(*colours):
        return {"objects": [{"present": True, "colour": c} for c in colours] + [{"present": False, "colour": "red"}]}

    scene = parse("a red circle bounces and a blue square rests on grass")
    assert two_colours_shown([reading("red", "blue"), reading("red", "red"), reading("blue"), reading()], scene) == 0.5
    assert two_colours_shown([reading("red")], scene) is None  # never both in view
    assert two_colours_shown([reading("red", "blue")], parse("a red circle and a square rest on grass")) is None
    # The world's own render of a two-colour prompt shows two colours whenever both subjects are in view.
    probe = load_probe(str(PROBE_PATH))
    prompt = "a large red solid circle rests and a large blue solid square rests on grass"
    frames, _ = render_clip(prompt, 17, seed=0)
    score = score_clip(probe, prompt, frames)
    assert score["subjects"] == 2 and score["two_colours"] >= 0.9


def test_summary_splits_adherence_by_the_number_of_subjects():
    def clip(subjects, colour, two_colours=None):
        return {"adherence": {"colour": colour}, "identity": {}, "scored_frames": 81, "frames": 81,
                "subjects": subjects, "two_colours": two_colours}

    summary = summarise([clip(1, 1.0), clip(1, 0.8), clip(2, 0.5, 0.25), clip(2, 0.7, 0.75)])
    assert np.isclose(summary["by_subjects"]["one"]["colour"]["mean"], 0.9)
    assert np.isclose(summary["by_subjects"]["two"]["colour"]["mean"], 0.6)
    assert summary["two_colours"]["mean"] == 0.5 and summary["two_colours"]["clips"] == 2
    assert summary["by_subjects"]["two"]["shape"]["clips"] == 0
