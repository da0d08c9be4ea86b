"""`tether bench latents`: labels from the world's ground truth, a classifier that finds what is there, the CLI."""

import json

import torch

from tether.bench.latents import classify, frame_labels
from tether.text import make_toy_text_encoder
from tether.train.toy_data import build_latent_dataset, sample_clip
from tether.vae import LatentCodec, load_vae
from tether.world import vocabulary
from tether.world.vocab import COLOUR_NAMES, PATTERNS, SHAPES, SIZES

from test_cli import tether


def test_labels_are_the_ground_truth_of_the_frame_each_latent_frame_is_read_at():
    where, labels = frame_labels(seed=0, clips=6, num_frames=33)
    assert len(where) > 0 and where[:, 1].max() <= 8  # 33 frames: 9 latent frames
    for (clip, k), label in zip(where.tolist()[:12], labels.tolist()):
        _, _, truths = sample_clip(0, clip, 33, with_truth=True)
        (obj,) = [o for o in truths[0 if k == 0 else 4 * k - 2].objects if o.visible]
        assert label == [SHAPES.index(obj.shape), COLOUR_NAMES.index(obj.colour),
                         PATTERNS.index(obj.pattern), SIZES.index(obj.size)]


def _synthetic(count, generator, informative):
    """Latent-like maps [count, 16, 8, 8]; if `informative`, each label is written as a one-hot at a random place."""
    labels = torch.stack([torch.randint(n, (count,), generator=generator) for n in (5, 6, 3, 2)], 1)
    inputs = torch.randn(count, 16, 8, 8, generator=generator) * 0.1
    if informative:
        y, x = torch.randint(8, (2, count), generator=generator)
        offsets = torch.tensor([0, 5, 11, 14])
        for i in range(count):
            inputs[i, offsets + labels[i], y[i], x[i]] += 1.0
    return inputs, labels


def test_the_classifier_reads_what_the_latents_hold_and_nothing_else(one_thread):
    generator = torch.Generator().manual_seed(0)
    is_test = torch.arange(600) >= 480
    inputs, labels = _synthetic(600, generator, informative=True)
    assert min(classify(inputs, labels, is_test, steps=200, batch_size=32, progress=False).values()) > 0.95
    inputs, labels = _synthetic(600, generator, informative=False)
    noise = classify(inputs, labels, is_test, steps=200, batch_size=32, progress=False)
    assert noise["shape"] < 0.4 and noise["colour"] < 0.4  # chance: 0.2 and 0.17


def test_cli_reports_accuracy_against_chance(tmp_path):
    codec = LatentCodec(load_vae("tiny"))
    text = make_toy_text_encoder(vocabulary(), dim=32, layers=1, heads=2, text_len=8, seed=0)
    build_latent_dataset(tmp_path / "data", codec, text, num_clips=15, num_frames=9, size=16, seed=0, progress=False)
    out = tmp_path / "latents.json"
    result = tether("bench", "latents", str(tmp_path / "data"), "--steps", "5", "--quiet", "--json", str(out))
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert report["clips"] == 15 and report["test_frames"] > 0
    assert set(report["accuracy"]) == {"shape", "colour", "pattern", "size"} and report["chance"]["shape"] == 0.2
    assert "shape" in result.stdout
    assert len(report["std_by_latent_frame"]) == 3 and "latent std by frame" in result.stdout  # 9 frames: 3 latent


def test_scale_by_frame_finds_a_first_frame_encoded_small():
    from tether.bench.latents import scale_by_frame

    latents = torch.randn(400, 4, 5, 6, 6, generator=torch.Generator().manual_seed(0))
    latents[:, :, 0] *= 0.25
    scales = scale_by_frame(latents, clips=300)
    assert len(scales) == 5 and abs(scales[0] - 0.25) < 0.01 and all(abs(s - 1) < 0.03 for s in scales[1:])


def test_cli_rejects_a_folder_that_is_not_a_dataset(tmp_path):
    result = tether("bench", "latents", str(tmp_path))
    assert result.returncode != 0 and "not an encoded toy dataset" in result.stderr
    assert "Traceback" not in result.stderr
