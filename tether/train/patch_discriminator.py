"""A per-frame patch discriminator, the adversarial half of VAE training (`vae` recipe, `loss.adversarial`).

An autoencoder trained on L1/MSE alone decodes what it is unsure of as the
average of the possibilities: fine stripes and dots come back as flat fill
(measured: the toy VAE's round trip reads 83 % of solid subjects right but
25-27 % of striped and dotted ones). A discriminator that judges small
patches of single frames penalises that average as not looking like a real
patch, whatever its pixel error. This is the patch-GAN term that LDM's and
Wan's VAEs are trained with, on hinge losses.

The generator's weight on it is adaptive, as in VQGAN: the ratio of the
reconstruction loss's gradient norm to the adversarial loss's gradient norm at
the decoder's last layer, so that the adversarial term never outweighs the
reconstruction by more than `loss.adversarial` times, whatever scale the
discriminator's outputs drift to.
"""

import torch
from torch import nn


class PatchDiscriminator(nn.Module):
    """Frames [N, 3, H, W] in [-1, 1] -> a realness logit per patch [N, 1, H/4, W/4].

    Two stride-2 convolutions: each logit sees ~14x14 pixels, a few stripe periods of the toy world.
    GroupNorm rather than BatchNorm, so real and fake batches are judged independently of each other.
    """

    def __init__(self, channels: int = 32, seed: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.layers = nn.Sequential(
            nn.Conv2d(3, channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2),
            nn.Conv2d(channels, 2 * channels, 4, stride=2, padding=1), nn.GroupNorm(8, 2 * channels), nn.LeakyReLU(0.2),
            nn.Conv2d(2 * channels, 2 * channels, 3, padding=1), nn.GroupNorm(8, 2 * channels), nn.LeakyReLU(0.2),
            nn.Conv2d(2 * channels, 1, 3, padding=1),
        )
        for module in self.layers:
            if isinstance(module, nn.Conv2d):  # DCGAN's init: small weights keep the first logits near 0
                with torch.no_grad():
                    module.weight.normal_(0.0, 0.02, generator=generator)
                    module.bias.zero_()

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        """Video [B, 3, T, H, W]: every frame is judged on its own."""
        frames = video.transpose(1, 2).flatten(0, 1)
        return self.layers(frames)


def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Hinge loss: real patches pushed above +1, reconstructed ones below -1."""
    return torch.relu(1 - real_logits).mean() + torch.relu(1 + fake_logits).mean()


def generator_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    return -fake_logits.mean()


def adaptive_weight(reconstruction: torch.Tensor, adversarial: torch.Tensor, last_layer: torch.Tensor,
                    limit: float = 1e4) -> torch.Tensor:
    """||d reconstruction / d last_layer|| / ||d adversarial / d last_layer||, detached (VQGAN's balance)."""
    rec_grad, = torch.autograd.grad(reconstruction, last_layer, retain_graph=True)
    adv_grad, = torch.autograd.grad(adversarial, last_layer, retain_graph=True)
    return (rec_grad.norm() / (adv_grad.norm() + 1e-4)).clamp(0.0, limit).detach()
