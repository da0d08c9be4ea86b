"""The VAE recipe's adversarial term: the patch discriminator, its losses, VQGAN's adaptive weight, and the recipe wiring."""

import json

import torch

from tether.train import Trainer
from tether.train.config import load_config
from tether.train.patch_discriminator import PatchDiscriminator, adaptive_weight, discriminator_loss, generator_loss
from tether.train.toy_data import clips_to_video, sample_clip
from tether.vae import load_vae

from test_toy_chain import TINY_VAE


def test_adaptive_weight_is_the_ratio_of_the_two_gradient_norms_at_the_layer():
    layer = torch.nn.Linear(4, 3)
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    out = layer(x)
    reconstruction, adversarial = out.pow(2).mean(), -7.0 * out[:, 0].mean()
    weight = adaptive_weight(reconstruction, adversarial, layer.weight)
    by_hand = []
    for loss in (reconstruction, adversarial):
        layer.zero_grad()
        loss.backward(retain_graph=True)
        by_hand.append(layer.weight.grad.norm())
    assert torch.allclose(weight, by_hand[0] / (by_hand[1] + 1e-4))
    assert not weight.requires_grad


def test_hinge_losses_are_zero_exactly_when_the_discriminator_is_confidently_right():
    sure, unsure = torch.full((2, 1, 3, 3), 1.5), torch.zeros(2, 1, 3, 3)
    assert discriminator_loss(sure, -sure).item() == 0.0
    assert discriminator_loss(unsure, unsure).item() == 2.0
    assert generator_loss(sure).item() == -1.5


def test_discriminator_learns_to_tell_world_frames_from_blurred_ones():
    frames = [sample_clip(0, index, 1, 32)[0] for index in range(8)]
    real = clips_to_video(frames)  # [8, 3, 1, 32, 32]
    blurred = torch.nn.functional.avg_pool2d(real[:, :, 0], 3, stride=1, padding=1, count_include_pad=False).unsqueeze(2)
    discriminator = PatchDiscriminator(channels=16)
    optimizer = torch.optim.Adam(discriminator.parameters(), lr=2e-3, betas=(0.5, 0.9))
    first = None
    for _ in range(40):
        loss = discriminator_loss(discriminator(real), discriminator(blurred))
        first = loss.item() if first is None else first
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert first > 1.9  # it starts knowing nothing: logits near 0
    assert loss.item() < 1.0
    with torch.no_grad():  # flat background patches look the same blurred, so judge whole frames
        real_score, blurred_score = (discriminator(v).mean(dim=(1, 2, 3)) for v in (real, blurred))
    # a frame of flat sky and no object barely changes when blurred: most frames, not all
    assert (real_score > blurred_score).float().mean() >= 0.75 and (real_score - blurred_score).mean() > 1.0


def test_vae_run_with_adversarial_term_trains_both_and_exports_only_the_vae(tmp_path):
    trainer = Trainer(load_config("vae", overrides=TINY_VAE + ["loss.adversarial=0.5", "discriminator.channels=8",
                                                               "save_every=2"]),
                      tmp_path / "run", progress=False)
    start = {k: v.clone() for k, v in PatchDiscriminator(8).state_dict().items()}
    trainer.run()
    logged = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert all({"adversarial", "adversarial_weight", "discriminator", "discriminator_accuracy"} <= set(row) for row in logged)
    assert all(row["adversarial_weight"] > 0 for row in logged)
    trained = trainer.recipe.discriminator.state_dict()
    assert any(not torch.equal(start[k], trained[k]) for k in start)
    saved = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert set(saved["models"]) == {"vae", "discriminator"} and "discriminator" in saved["optimizers"]
    trainer.recipe.export(tmp_path / "vae")
    load_vae(tmp_path / "vae")  # a plain VAE folder: strict loading would name a discriminator key


def test_vae_term_leaves_the_discriminator_without_gradients_and_waits_for_its_start(tmp_path):
    trainer = Trainer(load_config("vae", overrides=TINY_VAE + ["loss.adversarial=0.5", "discriminator.start=1"]),
                      tmp_path / "run", progress=False)
    recipe = trainer.recipe
    recipe.setup()
    video = recipe.batch(torch.Generator().manual_seed(0), 1)
    noise = torch.zeros(recipe.latent_shape(video))
    before, _ = recipe.losses(video, noise, step=0)
    assert "adversarial" not in before
    after, recon = recipe.losses(video, noise, step=1)
    after["loss"].backward()
    assert all(p.grad is None for p in recipe.discriminator.parameters())
    assert recipe.vae.decoder.conv_out.weight.grad is not None
    recipe.discriminator_terms(video, recon)["discriminator"].backward()
    assert all(p.grad is not None for p in recipe.discriminator.parameters())
    assert recipe.vae.decoder.conv_out.weight.grad is not None
