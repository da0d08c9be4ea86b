"""`tether bench binding`: swapped-word prompts, per-object regions, and the scoring, on oracle models."""

import dataclasses
import json

import torch

from tether.bench.binding import object_masks, score_clip, summarise
from tether.train.toy_data import object_mask, sample_clip
from tether.world.prompts import one_word_variants, parse
from tether.world.vocab import BACKGROUNDS, COLOUR_NAMES, SHAPES

from test_cli import tether


def test_each_variant_changes_one_word_of_one_object():
    prompt = "a red striped circle bounces and a large blue square rests on grass"
    scene = parse(prompt)
    tests = one_word_variants(prompt)
    assert set(tests) == {("background", None), ("colour", 0), ("pattern", 0), ("shape", 0),
                          ("size", 1), ("colour", 1), ("shape", 1)}
    truth, variants = tests[("colour", 1)]
    assert COLOUR_NAMES[truth] == "blue" and variants[truth] == prompt
    for colour, variant in zip(COLOUR_NAMES, variants):
        changed = parse(variant)
        assert changed.objects[0] == scene.objects[0]
        assert changed.objects[1] == dataclasses.replace(scene.objects[1], colour=colour)
    truth, variants = tests[("background", None)]
    assert [parse(v).background for v in variants] == list(BACKGROUNDS) and BACKGROUNDS[truth] == "grass"
    assert ("size", 0) not in tests  # unstated: nothing to test


def test_object_masks_are_each_objects_own_pixels():
    for index in range(40):
        _, prompt, truths = sample_clip(1, index, 81, 64, with_truth=True)
        if len(parse(prompt).objects) == 2:
            break
    masks = object_masks(truths, (21, 16, 16), 64, 4)
    union = object_mask(truths, 21, 16, 16, size=64, temporal_stride=4)
    assert len(masks) == 2 and masks[0].any() and masks[1].any()
    assert not (masks[0] & masks[1]).any()
    assert ((masks[0] | masks[1]) & ~union).sum() == 0


class Oracle(torch.nn.Module):
    """Predicts the exact flow of `clean`, plus an offset that grows with the text's distance from `true_text`."""

    def __init__(self, clean, true_text, blind=False):
        super().__init__()
        self.clean, self.true_text, self.blind = clean, true_text, blind

    def forward_bidirectional(self, noisy, timestep, text):
        sigma = (timestep / 1000.0).view(-1, 1, 1, 1, 1)
        noise = (noisy - (1 - sigma) * self.clean) / sigma
        offset = 0.1 if self.blind else (text - self.true_text).abs().mean(dim=(1, 2))
        return noise - self.clean + torch.as_tensor(offset).view(-1, 1, 1, 1, 1)


class WordEncoder:
    """A text 'encoder' where each prompt is its own one-hot row: distinct prompts, distinct embeddings."""

    def __init__(self):
        self.rows = {}

    def encode(self, prompts):
        for p in prompts:
            self.rows.setdefault(p, len(self.rows))
        out = torch.zeros(len(prompts), 1, 256)
        for i, p in enumerate(prompts):
            out[i, 0, self.rows[p]] = 1.0
        return out


def _clip_and_masks():
    for index in range(40):
        _, prompt, truths = sample_clip(1, index, 81, 64, with_truth=True)
        scene = parse(prompt)
        if scene.background is not None and any(o.colour for o in scene.objects):
            return prompt, object_masks(truths, (21, 16, 16), 64, 4)
    raise AssertionError("no clip states a background and a colour")


def test_a_model_that_binds_every_word_scores_perfectly_and_a_blind_one_scores_zero():
    prompt, masks = _clip_and_masks()
    clean = torch.randn(4, 21, 16, 16)
    encoder = WordEncoder()
    true_text = encoder.encode([prompt])
    timesteps = (250, 750)
    bound = score_clip(Oracle(clean, true_text), encoder, clean, masks, prompt, timesteps, torch.Generator().manual_seed(0))
    assert bound and all(t["correct"] and all(t["correct_at"].values()) for t in bound)
    assert {t["attribute"] for t in bound} >= {"background", "colour"}
    blind = score_clip(Oracle(clean, true_text, blind=True), encoder, clean, masks, prompt, timesteps,
                       torch.Generator().manual_seed(0))
    assert len(blind) == len(bound) and not any(t["correct"] for t in blind)
    summary = summarise([{"tests": bound}], timesteps)
    assert summary["background"]["accuracy"] == 1.0 and summary["background"]["chance"] == 1 / len(BACKGROUNDS)
    assert summary["shape"]["chance"] == 1 / len(SHAPES)


def test_cli_scores_the_built_in_teacher(tmp_path):
    out = tmp_path / "binding.json"
    result = tether("bench", "binding", "--clips", "2", "--timesteps", "500", "--threads", "1", "--quiet",
                    "--json", str(out))
    assert result.returncode == 0, result.stderr
    assert "true word wins" in result.stdout
    report = json.loads(out.read_text())
    assert report["clips"] == 2 and report["timesteps"] == [500]
    tested = [t for c in report["per_clip"] for t in c["tests"]]
    assert tested and sum(e["tests"] for e in report["binding"].values()) == len(tested)


def test_cli_refuses_a_bundle_without_a_teacher(tmp_path):
    result = tether("bench", "binding", "--checkpoint", "context-forcing", "--clips", "1", "--quiet")
    assert result.returncode != 0 and "teacher.safetensors" in result.stderr and "Traceback" not in result.stderr
