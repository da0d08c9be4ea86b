"""Error-Recycling Fine-Tuning's error bank [Context Forcing, after Stable Video Infinity].

A model that conditions on its own output sees drifted histories at inference
but clean ones in training. ERFT closes that gap by recording the model's own
residuals during training and adding them back to later inputs, so that the
model learns to recover the right velocity from a drifted history.

The bank: for each of `bins` timestep bins (uniform over [0, 1000]), a ring
buffer of the last `capacity` residuals of each kind: "x0" (predicted minus
true clean latent) and "noise" (predicted minus true noise). Errors depend
strongly on the noise level (an x0 error at t = 50 is far smaller than one at
t = 950), which is why they are kept per bin and drawn from the bin they are
injected at.

Where tether had to choose:

- The unit of storage is one latent frame [C, h, w], not a whole clip: one
  bank then serves the 6 motion frames and the 21 target frames alike (and any
  shorter layout), and a Wan-scale bank costs 21x less memory than one of
  whole clips: 50 x 500 x 2 kinds x 16x60x104 values, 20 GB in float32 and
  10 GB in bfloat16 (`dtype`), held on the host.
  A draw for F frames takes F entries of one bin independently.
- An empty bin gives no error (zeros), rather than borrowing a neighbour's:
  the target's velocity divides its error by sigma (see `cf_teacher`), which
  is only safe for errors of the sigma they were made at. Bins fill at the
  rate they are drawn, so a bin is empty only until its first draw.
  Motion errors, which are not tied to a timestep, come from any filled bin.
- The bank is part of the training state (`state_dict`): a resumed run must
  draw the same errors as an uninterrupted one. Recipes feed it the residuals
  of the global batch (gathered from every rank), so every rank holds the
  same bank and one saved copy restores them all.
"""

from dataclasses import dataclass

import torch

from ..errors import TetherError

KINDS = ("x0", "noise")


def timestep_bins(timesteps: torch.Tensor, bins: int) -> torch.Tensor:
    """Bin index of each timestep in [0, 1000]: bin i covers [1000 i / bins, 1000 (i + 1) / bins)."""
    timesteps = torch.as_tensor(timesteps, dtype=torch.float64).detach().cpu()
    return torch.floor(timesteps * bins / 1000.0).long().clamp(0, bins - 1)  # t = 1000 joins the last bin


class ErrorBank:
    """Per-bin ring buffers of per-frame residuals, one set per kind ("x0", "noise")."""

    def __init__(self, bins: int = 50, capacity: int = 500, dtype: torch.dtype = torch.float32):
        if bins < 1 or capacity < 1:
            raise TetherError(f"an error bank needs bins >= 1 and capacity >= 1, got {bins} and {capacity}")
        self.bins = bins
        self.capacity = capacity
        self.dtype = dtype
        # storage[kind] is [bins, capacity, C, h, w], allocated at the first add (the frame shape is learnt then)
        self.storage = {}
        # written[kind][b] counts every frame ever written to bin b: the ring's next slot is written % capacity
        self.written = {kind: torch.zeros(bins, dtype=torch.long) for kind in KINDS}

    # ---- filling -------------------------------------------------------------
    def add(self, kind: str, timesteps: torch.Tensor, errors: torch.Tensor) -> None:
        """Record residuals [B, C, F, h, w] of samples drawn at timesteps [B] (every frame is one entry)."""
        self._check_kind(kind)
        errors = errors.detach().to("cpu", self.dtype)
        frames = errors.permute(0, 2, 1, 3, 4)  # [B, F, C, h, w]
        if kind not in self.storage:
            self.storage[kind] = torch.zeros((self.bins, self.capacity, *frames.shape[2:]), dtype=self.dtype)
        store = self.storage[kind]
        if tuple(store.shape[2:]) != tuple(frames.shape[2:]):
            raise TetherError(f"error bank holds frames of shape {tuple(store.shape[2:])}, "
                              f"got {tuple(frames.shape[2:])}")
        for sample, b in enumerate(timestep_bins(timesteps, self.bins).tolist()):
            for frame in frames[sample]:
                store[b, self.written[kind][b] % self.capacity] = frame
                self.written[kind][b] += 1

    # ---- drawing -------------------------------------------------------------
    def filled(self, kind: str) -> torch.Tensor:
        """How many entries each bin holds now: [bins]."""
        return self.written[kind].clamp(max=self.capacity)

    def filled_bins(self, kind: str) -> torch.Tensor:
        """The bins holding at least one entry, ascending."""
        return torch.nonzero(self.filled(kind) > 0).flatten()

    def sample(self, kind: str, bins: torch.Tensor, frames: int, generator: torch.Generator,
               shape=None) -> torch.Tensor:
        """Errors [B, C, frames, h, w] for samples in `bins` [B]; zeros for an empty bin.

        Every sample takes the same number of random draws whatever the bank
        holds, so the generator's later draws do not depend on how full it is.
        `shape` ([C, h, w]) is needed only when nothing has been stored yet.
        """
        self._check_kind(kind)
        bins = torch.as_tensor(bins).long().flatten()
        picks = torch.rand((len(bins), frames), generator=generator, dtype=torch.float64)
        if kind not in self.storage:
            if shape is None:
                raise TetherError("the error bank is empty: pass the frame shape to sample zeros")
            return torch.zeros((len(bins), shape[0], frames, *shape[1:]))
        store = self.storage[kind]
        out = torch.zeros((len(bins), frames, *store.shape[2:]))
        filled = self.filled(kind)
        for sample, b in enumerate(bins.tolist()):
            if filled[b] == 0:
                continue
            slots = (picks[sample] * int(filled[b])).long().clamp(max=int(filled[b]) - 1)
            out[sample] = store[b, slots].float()
        return out.permute(0, 2, 1, 3, 4)

    # ---- saving --------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"bins": self.bins, "capacity": self.capacity,
                "storage": {k: v.clone() for k, v in self.storage.items()},
                "written": {k: v.clone() for k, v in self.written.items()}}

    def load_state_dict(self, state: dict) -> None:
        if (state["bins"], state["capacity"]) != (self.bins, self.capacity):
            raise TetherError(f"error bank state is {state['bins']} bins x {state['capacity']}, "
                              f"this bank {self.bins} x {self.capacity}")
        self.storage = {k: v.to(self.dtype).clone() for k, v in state["storage"].items()}
        self.written = {k: v.clone() for k, v in state["written"].items()}

    def _check_kind(self, kind: str) -> None:
        if kind not in KINDS:
            raise TetherError(f"unknown error kind '{kind}' (known: {', '.join(KINDS)})")


# ---- the injection policy ------------------------------------------------------

@dataclass
class Injection:
    """Which parts of each sample get an error this step: bool [B] each.

    Half the samples (p_inject) get no error at all, so the model keeps
    its clean-input behaviour; the others perturb the motion latents and the
    clean target most of the time and the noise rarely. The sink and the
    sparse context are never perturbed: they stand for frames the memory
    holds from long ago, which the teacher must be able to trust.
    """

    inject: torch.Tensor
    motion: torch.Tensor
    target: torch.Tensor
    noise: torch.Tensor


@dataclass
class InjectionRates:
    inject: float = 0.5
    motion: float = 0.9
    target: float = 0.9
    noise: float = 0.01

    @classmethod
    def from_config(cls, cfg: dict) -> "InjectionRates":
        return cls(**{k: float(v) for k, v in (cfg or {}).items()})


def draw_injection(generator: torch.Generator, size: int, rates: InjectionRates = InjectionRates()) -> Injection:
    """Independent coins per sample; the part coins are drawn always and masked, so draws do not depend on outcomes."""
    coins = torch.rand((4, size), generator=generator, dtype=torch.float64)
    inject = coins[0] < rates.inject
    return Injection(inject=inject, motion=inject & (coins[1] < rates.motion),
                     target=inject & (coins[2] < rates.target), noise=inject & (coins[3] < rates.noise))


def draw_errors(bank: ErrorBank, injection: Injection, timesteps: torch.Tensor, motion_frames: int,
                target_frames: int, frame_shape, generator: torch.Generator) -> dict:
    """The errors to add for one global batch: {"motion", "target", "noise"}, zero where not injected.

    Target and noise errors come from the bin of the sample's timestep. The
    motion latents are finished (clean) frames whose drift is whatever the
    sampler left at any of its steps, so their x0 errors come from a filled
    bin drawn uniformly per sample.
    """
    size = len(timesteps)
    target_bins = timestep_bins(timesteps, bank.bins)
    filled = bank.filled_bins("x0")
    pick = torch.rand(size, generator=generator, dtype=torch.float64)
    motion_bins = filled[(pick * len(filled)).long()] if len(filled) else torch.zeros(size, dtype=torch.long)
    errors = {
        "motion": bank.sample("x0", motion_bins, motion_frames, generator, frame_shape),
        "target": bank.sample("x0", target_bins, target_frames, generator, frame_shape),
        "noise": bank.sample("noise", target_bins, target_frames, generator, frame_shape),
    }
    for part, error in errors.items():
        error.mul_(getattr(injection, part).view(-1, 1, 1, 1, 1).to(error.dtype))
    return errors
