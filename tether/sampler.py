"""Few-step causal sampling of one chunk [Self-Forcing].

Per chunk: start from noise; at each step predict x0 and re-noise it with
fresh noise to the next step's level; the last x0 is the chunk. Then run the
chunk once more at `context_noise` so the memory caches clean K/V: 4 + 1
forward passes per chunk with the default list. All passes of a chunk share
one attention layout.

A sampler's `next_chunk(stream)` returns the next finished chunk's latents;
policies with their own sampling scheme (Rolling Forcing) provide another.
"""

import torch

from .memory.base import CachedFrame
from .schedule import DEFAULT_SHIFT, add_noise, predict_x0, warp_steps


def frames_from_capture(captured, latents, first_index: int, grid) -> list:
    """Split a commit pass's per-layer K/V into one CachedFrame per latent frame."""
    keys = torch.stack([k for k, _ in captured])  # [L, B, F*T, heads, dim]
    values = torch.stack([v for _, v in captured])
    num_frames = latents.shape[2]
    keys = keys.unflatten(2, (num_frames, -1))
    values = values.unflatten(2, (num_frames, -1))
    return [
        CachedFrame(first_index + i, latents[:, :, i], keys[:, :, i].contiguous(), values[:, :, i].contiguous(), grid)
        for i in range(num_frames)
    ]


def commit(stream, x0, view, text_ctx, first_index=None):
    """Run the clean commit pass of x0 and hand its K/V to the policy."""
    model, policy = stream.model, stream.policy
    t = stream.context_noise
    x_in = x0 if t == 0 else add_noise(x0, stream.noise_like(x0), t)
    _, captured = model.forward_cached(x_in, t, text_ctx, view.layout.query_positions, past=view, capture=True)
    first = policy.next_index if first_index is None else first_index
    frames = frames_from_capture(captured, x0, first, stream.token_grid)
    policy.commit(frames)
    policy.advance(x0.shape[2])
    return frames


class FewStepSampler:
    def __init__(self, denoising_steps=(1000, 750, 500, 250), shift: float = DEFAULT_SHIFT, warp: bool = True):
        self.timesteps = warp_steps(denoising_steps, shift) if warp else [float(t) for t in denoising_steps]

    def forwards_per_chunk(self) -> int:
        return len(self.timesteps) + 1

    def denoise(self, stream, view, text_ctx, noise):
        """Few-step denoising of one chunk from `noise` against `view`; returns x0."""
        model = stream.model
        x = noise
        for i, t in enumerate(self.timesteps):
            flow = model.forward_cached(x, t, text_ctx, view.layout.query_positions, past=view)
            x0 = predict_x0(x.float(), flow.float(), t)
            if i + 1 < len(self.timesteps):
                x = add_noise(x0, stream.noise_like(x0), self.timesteps[i + 1]).to(noise.dtype)
        return x0

    def next_chunk(self, stream):
        text_ctx = stream.text_for_chunk(stream.chunk_index)
        view = stream.policy.view(stream.chunk_frames, stream.model.rotate_keys)
        stream.record_positions(view.layout)
        noise = stream.noise(stream.chunk_frames)
        x0 = self.denoise(stream, view, text_ctx, noise).to(noise.dtype)
        commit(stream, x0, view, text_ctx)
        return x0
