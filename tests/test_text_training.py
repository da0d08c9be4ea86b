"""Training the toy text encoder along with the teacher (the frozen-vs-trained question of the toy-world issue)."""

import json

import pytest
import torch
from safetensors.torch import load_file

from tether.errors import TetherError
from tether.text import load_text_encoder, make_toy_text_encoder, save_toy_text_encoder
from tether.train import Trainer
from tether.train.config import load_config
from tether.world import vocabulary

PROMPTS = ["a red circle bounces on grass", "a small blue striped star rests in the desert",
           "a green dotted square drifts left over the ocean", "a large orange triangle orbits under the night sky"]


def _encoder():
    return make_toy_text_encoder(vocabulary(), dim=32, layers=1, heads=2, text_len=16, seed=0)


def _dataset(folder, with_prompts=True):
    """Random latents shaped for the tiny transformer, the frozen encoder's embeddings and the prompts."""
    folder.mkdir()
    text = _encoder().encode(PROMPTS)
    torch.save({"latents": torch.randn(len(PROMPTS), 4, 6, 4, 4).half(), "text": text.half()}, folder / "latents.pt")
    if with_prompts:
        (folder / "prompts.json").write_text(json.dumps({"prompts": PROMPTS}))


def test_embed_is_encode_with_gradients():
    encoder = _encoder()
    cached = encoder.encode(PROMPTS)
    encoder.model.requires_grad_(True)
    embedded = encoder.embed(PROMPTS)
    assert embedded.shape == cached.shape and embedded.requires_grad
    torch.testing.assert_close(embedded.detach(), cached, rtol=0, atol=1e-6)
    assert (embedded.detach()[0, len(PROMPTS[0].split()) + 1:] == 0).all()  # exact zeros past words + </s>
    embedded.square().sum().backward()
    assert encoder.model.shared.weight.grad.abs().sum() > 0


def _teacher(tmp_path, *extra):
    overrides = ["model.source=tiny", "data.kind=latents", f"data.path={tmp_path / 'data'}", "data.frames=6",
                 "batch_size=2", "ema=0.5", "steps=3", "text.train=true", f"text.source={tmp_path / 'text'}", *extra]
    return Trainer(load_config("teacher", overrides=overrides), tmp_path / "run", progress=False)


def test_teacher_trains_the_text_encoder_and_exports_it(tmp_path):
    _dataset(tmp_path / "data")
    save_toy_text_encoder(_encoder(), tmp_path / "text")
    trainer = _teacher(tmp_path)
    last = trainer.run()
    assert last["text_grad_norm"] > 0
    trainer.recipe.export(tmp_path / "export")
    before = load_file(str(tmp_path / "text" / "text_encoder.safetensors"))
    after = load_file(str(tmp_path / "export" / "text_encoder" / "text_encoder.safetensors"))
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    trained = load_text_encoder(tmp_path / "export" / "text_encoder")
    assert not torch.allclose(trained.encode(PROMPTS), _encoder().encode(PROMPTS))


def test_text_training_needs_the_prompts(tmp_path):
    _dataset(tmp_path / "data", with_prompts=False)
    save_toy_text_encoder(_encoder(), tmp_path / "text")
    with pytest.raises(TetherError, match="prompts.json"):
        _teacher(tmp_path).run()
