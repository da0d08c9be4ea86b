"""Distribution Matching Distillation, piece by piece [Self-Forcing, SPEC §4].

A few-step generator is pulled towards the teacher's distribution by the
difference of two denoisers evaluated on its own (re-noised) samples: the
frozen real score (the teacher, with classifier-free guidance) and a critic
(the "fake score") that keeps learning the generator's current distribution
by flow matching on generated samples.

    grad = (x0_fake - x0_real) / mean|x - x0_real|     (per sample)
    generator loss = 0.5 * MSE(x, stopgrad(x - grad))

The loss's gradient with respect to x is grad / x.numel(): a surrogate that
lets autograd carry the DMD direction back through the rollout.

Where the scores come from (`score_sources`): `teacher.source` and
`critic.source` name checkpoints or named configs. Left unset, the teacher
follows `model.source` and the critic follows the teacher, so a recipe run
with `model.source=tiny` (the test suite's override) builds tiny scores that
fit the tiny student. A real run names both, e.g.
`teacher.source=runs/teacher/transformer.safetensors`.
"""

import torch
import torch.nn.functional as F

from ..checkpoints import load_transformer
from ..errors import TetherError
from ..schedule import shifted_sigma

#: SF samples DMD timesteps in [0.02, 0.98] of the 1000-step range: the ends carry no signal
#: (t ~ 0: both scores return x; t ~ 1000: both return a mean image).
DMD_MIN_STEP, DMD_MAX_STEP = 20.0, 980.0


# ---- where the scores come from ----------------------------------------------
def score_sources(cfg: dict) -> tuple:
    """(teacher source, critic source) after the fallbacks described in the module docstring."""
    teacher = (cfg.get("teacher") or {}).get("source") or cfg["model"]["source"]
    critic = (cfg.get("critic") or {}).get("source") or teacher
    return teacher, critic


def load_score(source, student_config, what: str):
    """A teacher or critic that can read the student's latents and text."""
    model = load_transformer(source)
    for field in ("in_channels", "out_channels", "patch_size", "text_dim"):
        if getattr(model.config, field) != getattr(student_config, field):
            raise TetherError(f"{what} '{source}' has {field}={getattr(model.config, field)} but the generator has "
                              f"{getattr(student_config, field)}: set {what}.source to a model of the same family")
    return model.float()


# ---- timesteps -----------------------------------------------------------------
def dmd_timesteps(generator, size: int, shift: float, low: float = DMD_MIN_STEP, high: float = DMD_MAX_STEP):
    """One DMD timestep per sample: uniform in [low, high), shifted, clamped back to [low, high] (SF's order)."""
    uniform = torch.randint(int(low), int(high), (size,), generator=generator).double() / 1000.0
    return (1000.0 * shifted_sigma(uniform, shift)).clamp(low, high).float()


def _sigma(timesteps, like):
    return (timesteps.to(like.device, torch.float32) / 1000.0).view(-1, *([1] * (like.dim() - 1)))


def noised(x, noise, timesteps):
    """x_t = (1 - sigma) x + sigma noise, with one timestep per sample."""
    sigma = _sigma(timesteps, x)
    return (1 - sigma) * x + sigma * noise


# ---- the scores ------------------------------------------------------------------
def predict_x0(model, noisy, timesteps, text):
    """x0 = x_t - sigma v from a bidirectional denoiser, in float32."""
    flow = model.forward_bidirectional(noisy, timesteps, text)
    return noisy.float() - _sigma(timesteps, noisy) * flow.float()


def guided_x0(model, noisy, timesteps, text, guidance: float):
    """The real score's x0 with classifier-free guidance, in SF's form: cond + guidance * (cond - uncond).

    SF's `real_guidance_scale` 3.0 in this form is 4.0 in the textbook
    uncond + w (cond - uncond) form. The unconditional text is all zeros,
    which is what the teacher recipe's text dropout trains it on.
    """
    if guidance == 0:
        return predict_x0(model, noisy, timesteps, text)
    # one forward on [cond | uncond]: half the calls, and larger matmuls
    both = predict_x0(model, torch.cat([noisy, noisy]), torch.cat([timesteps, timesteps]),
                      torch.cat([text, torch.zeros_like(text)]))
    cond, uncond = both.chunk(2)
    return cond + guidance * (cond - uncond)


def per_segment(score, noisy, segments):
    """Run `score(noisy, text)` once per prompt and keep each frame's prediction under its own prompt.

    `segments` is [(first frame, text)] in order; with one segment this is a
    single call. After a prompt switch inside the supervised window, every
    frame is judged by the prompt it was generated under, while still seeing
    the whole window.
    """
    if len(segments) == 1:
        return score(noisy, segments[0][1])
    bounds = [start for start, _ in segments] + [noisy.shape[2]]
    pieces = [score(noisy, text)[:, :, a:b] for (a, text), b in zip(segments, bounds[1:])]
    return torch.cat(pieces, dim=2)


# ---- the generator's loss -----------------------------------------------------------
def dmd_gradient(x, x0_real, x0_fake):
    """(x0_fake - x0_real) / mean|x - x0_real|, the mean taken per sample.

    The normaliser makes the step size independent of how far the sample is
    from the teacher's reconstruction; nan_to_num guards a sample the teacher
    reproduces exactly.
    """
    dims = list(range(1, x.dim()))
    normaliser = (x.float() - x0_real.float()).abs().mean(dim=dims, keepdim=True)
    return torch.nan_to_num((x0_fake.float() - x0_real.float()) / normaliser)


def dmd_generator_loss(x, grad):
    """0.5 * MSE(x, stopgrad(x - grad)): its gradient w.r.t. x is grad / x.numel()."""
    target = (x.double() - grad.double()).detach()
    return 0.5 * F.mse_loss(x.double(), target)


def dmd_loss(x, real_score, fake_score, timesteps, noise, guidance: float, segments):
    """The generator's DMD loss on samples x [B, C, F, h, w] (gradients flow through x only).

    `real_score` / `fake_score` are bidirectional models; `timesteps` [B]
    from `dmd_timesteps` and `noise` like x are drawn by the caller (globally,
    then sliced per rank); `segments` as in `per_segment`. Returns (loss,
    the DMD gradient's mean absolute value).
    """
    with torch.no_grad():
        noisy = noised(x.detach(), noise, timesteps)
        x0_real = per_segment(lambda z, text: guided_x0(real_score, z, timesteps, text, guidance), noisy, segments)
        x0_fake = per_segment(lambda z, text: predict_x0(fake_score, z, timesteps, text), noisy, segments)
        grad = dmd_gradient(x.detach(), x0_real, x0_fake)
    return dmd_generator_loss(x, grad), grad.abs().mean().item()


# ---- the critic's loss --------------------------------------------------------------
def critic_loss(critic, x, timesteps, noise, segments):
    """Flow matching of the critic on generated samples x (detached), at DMD timesteps.

    The critic must denoise the generator's distribution as well as the
    teacher denoises the data's; its target is the flow v = noise - x.
    """
    x = x.detach()
    noisy = noised(x, noise, timesteps)
    flow = per_segment(lambda z, text: critic.forward_bidirectional(z, timesteps, text), noisy, segments)
    return torch.mean((flow.float() - (noise - x).float()) ** 2)


def trains_generator(step: int, every: int) -> bool:
    """SF's two-time-scale schedule: the critic steps every step, the generator every `every`-th (from step 0)."""
    return step % every == 0
