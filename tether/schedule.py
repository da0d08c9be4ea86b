"""Flow-matching noise schedule and Self-Forcing's few-step list.

x_t = (1 - sigma) * x0 + sigma * noise; the model predicts v = noise - x0,
so x0 = x_t - sigma * v. Timestep = 1000 * sigma.
"""

import torch

# Wan2.1's and Self-Forcing's timestep shift at 480p. A model trained with another shift states it
# (a bundle's pipeline.json "shift"), and its sampler must use that one.
DEFAULT_SHIFT = 5.0


def shifted_sigma(s: torch.Tensor, shift: float) -> torch.Tensor:
    return shift * s / (1 + (shift - 1) * s)


def timestep_grid(shift: float = 5.0, steps: int = 1000) -> torch.Tensor:
    """The 1000-step training grid of timesteps, from 1000 down, plus a final 0."""
    s = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)[:-1]
    return torch.cat([1000.0 * shifted_sigma(s, shift), torch.zeros(1, dtype=torch.float64)])


def warp_steps(denoising_steps, shift: float = 5.0, steps: int = 1000) -> list:
    """Map a nominal step list such as [1000, 750, 500, 250] onto the shifted grid.

    Self-Forcing indexes the grid as `grid[1000 - t]`, so 750 becomes 937.5 at shift 5.
    """
    grid = timestep_grid(shift, steps)
    return [float(grid[steps - int(t)]) for t in denoising_steps]


def sigma_of(timestep) -> float:
    return float(timestep) / 1000.0


def add_noise(x0: torch.Tensor, noise: torch.Tensor, timestep) -> torch.Tensor:
    sigma = sigma_of(timestep)
    return (1 - sigma) * x0 + sigma * noise


def predict_x0(x_t: torch.Tensor, flow: torch.Tensor, timestep) -> torch.Tensor:
    return x_t - sigma_of(timestep) * flow
