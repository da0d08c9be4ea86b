"""The teacher's word-contrast loss: variant prompts, the hinge, and the recipe running it."""

import dataclasses

import numpy as np
import pytest
import torch

from tether.errors import TetherError
from tether.text import make_toy_text_encoder, save_toy_text_encoder
from tether.train import Trainer
from tether.train.config import load_config
from tether.train.toy_data import build_latent_dataset
from tether.train.word_contrast import swapped_prompt, word_contrast_loss
from tether.vae import LatentCodec, load_vae
from tether.world import parse, vocabulary
from tether.world.prompts import one_word_variants


def test_a_swapped_prompt_changes_one_stated_subject_word_and_nothing_else():
    prompt = "a red striped circle bounces and a large blue square rests on grass"
    scene = parse(prompt)
    seen = set()
    generator = torch.Generator().manual_seed(0)
    for _ in range(200):
        variant = parse(swapped_prompt(prompt, ("shape", "colour", "pattern", "size"), generator))
        assert variant.background == scene.background
        changes = [(i, f.name) for i, (a, b) in enumerate(zip(scene.objects, variant.objects))
                   for f in dataclasses.fields(a) if getattr(a, f.name) != getattr(b, f.name)]
        assert len(changes) == 1
        seen.add(changes[0])
    # Every stated word gets swapped, and no unstated one (object 0's size, object 1's pattern).
    assert seen == {(0, "colour"), (0, "pattern"), (0, "shape"), (1, "size"), (1, "colour"), (1, "shape")}
    shapes = {(v.objects[0].shape, v.objects[1].shape)
              for v in (parse(swapped_prompt(prompt, ("shape",), generator)) for _ in range(200))}
    assert {a for a, b in shapes if b == "square"} == {"square", "triangle", "diamond", "star"}  # never the truth
    assert {b for a, b in shapes if a == "circle"} == {"circle", "triangle", "diamond", "star"}
    assert swapped_prompt("a shape bounces on grass", ("shape", "colour"), generator) is None


def test_the_hinge_is_zero_past_the_margin_and_judges_only_the_subjects_pixels():
    mask = torch.zeros(1, 1, 1, 2, 2)
    mask[..., 0, 0] = 1
    true_error = torch.full((1, 2, 1, 2, 2), 1.0)
    far = true_error * 1.2
    assert word_contrast_loss(true_error, far, mask, margin=0.1) == 0
    near = true_error * 1.05
    assert torch.isclose(word_contrast_loss(true_error, near, mask, margin=0.1), torch.tensor(0.05))
    better_elsewhere = far.clone()
    better_elsewhere[..., 1, 1] = 0.0  # the variant does better off the subject: no matter
    assert word_contrast_loss(true_error, better_elsewhere, mask, margin=0.1) == 0
    assert word_contrast_loss(true_error, near, torch.zeros_like(mask), 0.1) == 0  # no subject in view


def test_the_hinge_pulls_the_true_error_down_and_pushes_the_variant_error_up():
    mask = torch.ones(2, 1, 1, 2, 2)
    mask[1] = 0  # the second clip shows no subject and takes no part
    true_error = torch.full((2, 1, 1, 2, 2), 1.0, requires_grad=True)
    variant_error = torch.full((2, 1, 1, 2, 2), 1.0, requires_grad=True)
    word_contrast_loss(true_error, variant_error, mask, margin=0.1).backward()
    assert (true_error.grad[0] > 0).all() and (variant_error.grad[0] < 0).all()
    assert (true_error.grad[1] == 0).all() and (variant_error.grad[1] == 0).all()


def test_the_teacher_recipe_trains_with_word_contrast_and_refuses_a_foreign_text_encoder(tmp_path):
    codec = LatentCodec(load_vae("tiny"))
    text = make_toy_text_encoder(vocabulary(), dim=128, layers=1, heads=2, text_len=32, seed=0)
    save_toy_text_encoder(text, tmp_path / "text")
    data = tmp_path / "data"
    build_latent_dataset(data, codec, text, num_clips=4, num_frames=9, size=16, seed=0, progress=False)
    overrides = ["model.source=toy", "data.kind=latents", f"data.path={data}", "data.frames=2", "batch_size=4", "steps=2",
                 "save_every=2", "text_dropout=0.0", f"text.source={tmp_path / 'text'}",
                 "loss.word_contrast={weight: 1.0, margin: 0.1, min_timestep: 0}"]
    trainer = Trainer(load_config("teacher", overrides=overrides), tmp_path / "run", progress=False)
    metrics = trainer.run()
    assert np.isfinite(metrics["loss"]) and np.isfinite(metrics["word_contrast"]) and metrics["word_contrast"] >= 0
    trainer.recipe.export(tmp_path / "export")
    assert (tmp_path / "export" / "transformer.safetensors").is_file()
    assert not (tmp_path / "export" / "text_encoder").exists()  # frozen: nothing of it to export

    other = make_toy_text_encoder(vocabulary(), dim=128, layers=1, heads=2, text_len=32, seed=1)
    save_toy_text_encoder(other, tmp_path / "other")
    foreign = [o.replace(str(tmp_path / "text"), str(tmp_path / "other")) for o in overrides]
    with pytest.raises(TetherError, match="stored prompt embeddings"):
        Trainer(load_config("teacher", overrides=foreign), tmp_path / "run2", progress=False).run()
    with pytest.raises(TetherError, match="text.source"):
        Trainer(load_config("teacher", overrides=overrides[:8] + overrides[9:]), tmp_path / "run3", progress=False).run()


def test_a_leak_variant_gives_one_subject_the_other_subjects_stated_value():
    prompt = "a red striped circle bounces and a large blue square rests on grass"
    generator = torch.Generator().manual_seed(0)
    leaked = {tuple((o.colour, o.shape) for o in parse(swapped_prompt(prompt, ("colour", "shape"), generator, leak=1.0)).objects)
              for _ in range(100)}
    assert leaked == {(("blue", "circle"), ("blue", "square")), (("red", "circle"), ("red", "square")),
                      (("red", "square"), ("blue", "square")), (("red", "circle"), ("blue", "circle"))}
    # Nothing to leak where only one subject states the attribute, or both state the same value.
    assert parse(swapped_prompt(prompt, ("size",), generator, leak=1.0)).objects[1].size != "large"
    same = "a red circle bounces and a red square rests on grass"
    assert {parse(swapped_prompt(same, ("colour",), generator, leak=1.0)).objects[0].colour for _ in range(50)} - {"red"}
    # leak=0 draws what plain swaps drew before leak variants existed (the shipped teacher's phase):
    # a stated word, then one of its other values, two draws and nothing else.
    a, b = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    entries = [e for (name, index), e in one_word_variants(prompt).items() if index is not None and name == "colour"]
    expected = []
    for _ in range(20):
        truth, variants = entries[torch.randint(len(entries), (1,), generator=b).item()]
        other = torch.randint(len(variants) - 1, (1,), generator=b).item()
        expected.append(variants[other + (other >= truth)])
    assert [swapped_prompt(prompt, ("colour",), a, leak=0.0) for _ in range(20)] == expected
