"""Wan's 3D rotary position embedding, with positions given explicitly.

The head dimension is split into time / height / width bands (Wan: h and w get
2*(d//6) real dims each, time the rest). Each band rotates consecutive pairs
of channels by position * frequency. Frequencies are computed from the
positions on demand, so there is no table and no length limit: the forks
index a 1024-entry table with the absolute frame number and crash past it.
"""

import torch


class Rope3D:
    def __init__(self, head_dim: int, theta: float = 10000.0):
        hw = 2 * (head_dim // 6)
        self.band_dims = (head_dim - 2 * hw, hw, hw)
        self.theta = theta
        self.head_dim = head_dim
        self._inv_freq = [
            1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)) for d in self.band_dims
        ]
        self._grid_cache = {}

    def _angles(self, band: int, positions: torch.Tensor) -> torch.Tensor:
        return positions.to(torch.float64)[:, None] * self._inv_freq[band][None, :]

    def _spatial(self, height: int, width: int) -> torch.Tensor:
        """Angles [h*w, (dh+dw)/2] of the spatial bands; they never change, so cache them."""
        key = (height, width)
        if key not in self._grid_cache:
            ah = self._angles(1, torch.arange(height))[:, None, :].expand(height, width, -1)
            aw = self._angles(2, torch.arange(width))[None, :, :].expand(height, width, -1)
            self._grid_cache[key] = torch.cat([ah, aw], dim=-1).reshape(height * width, -1)
        return self._grid_cache[key]

    def cos_sin(self, frame_positions, height: int, width: int, device=None):
        """cos/sin [F*h*w, head_dim/2] (float32) for frames at the given temporal positions.

        Tokens are ordered frame-major then row-major, as Wan patchifies.
        """
        positions = torch.as_tensor(frame_positions, dtype=torch.float64).reshape(-1)
        at = self._angles(0, positions)  # [F, dt/2]
        spatial = self._spatial(height, width)  # [hw, (dh+dw)/2]
        n_frames, n_tokens = at.shape[0], spatial.shape[0]
        angles = torch.cat(
            [at[:, None, :].expand(n_frames, n_tokens, -1), spatial[None].expand(n_frames, -1, -1)], dim=-1
        ).reshape(n_frames * n_tokens, -1)
        return angles.cos().float().to(device), angles.sin().float().to(device)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, S, heads, head_dim] by per-token angles (cos/sin [S, head_dim/2])."""
    dtype = x.dtype
    pairs = x.float().unflatten(-1, (-1, 2))
    real, imag = pairs[..., 0], pairs[..., 1]
    cos = cos[None, :, None, :]
    sin = sin[None, :, None, :]
    rotated = torch.stack([real * cos - imag * sin, real * sin + imag * cos], dim=-1)
    return rotated.flatten(-2).to(dtype)
