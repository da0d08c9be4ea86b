"""Rolling Forcing [Rolling Forcing]: a rolling window denoised jointly, plus a sink.

The paper's rule: 5 chunks (15 latent frames) are denoised together with
staggered noise, steps [1000, 800, 600, 400, 200] at shift 5: the oldest
chunk at the lowest noise, the newest at pure noise. One forward denoises the
whole window (per-frame timesteps); the oldest chunk is then finished, the
others are re-noised to their next level and a new chunk enters at pure
noise. The finished chunk is re-run at t=0 to commit its K/V. The sink is the
first chunk, cached without RoPE and placed at the positions just before the
working cache; keys are capped at 21 frames. Cost: 1 forward of <= 15 frames
+ 1 commit per chunk, after a warm-up of 5 forwards for the first chunk.

Where tether chose:
- The step list is warped onto the shifted grid like Self-Forcing's
  (`schedule.warp_steps`: 800 -> 952.4, ..., 200 -> 555.6): Rolling Forcing
  inherits Self-Forcing's sampler, and "shift 5" is how that code applies it
  (a model trained at another shift gets its own, through the stream).
  `warp=False` uses the nominal values.
- The 21-frame cap counts the window's own 15 frames, so the cache holds at
  most 6: the sink (frames 0-2) and the last committed chunk. Committed
  frames keep absolute positions, the window continues them, and the sink is
  re-placed right before the oldest cached frame: positions grow without
  bound (like frame-sink), the sink moves with the window.
- A chunk cross-attends to its own prompt (`stream.text_for_chunk`, which
  looks ahead on a timeline). The model takes one prompt per forward, so when
  the window straddles a switch the window runs once per prompt in one
  batched forward and each chunk keeps the row of its own prompt. Rolling
  Forcing itself has a single prompt; its default switch rule is `text-reset`.
- Chunks past the end of a timeline enter the window (with the last prompt)
  like any other; the stream stops asking before they finish.
"""

import math
from dataclasses import dataclass

import torch

from ..errors import TetherError
from ..model.transformer import TextContext
from .. import sampler  # the module, not its names: tether.sampler imports tether.memory
from ..schedule import DEFAULT_SHIFT, add_noise, predict_x0, warp_steps
from .base import Layout
from .sink import SinkAndRecent

ROLLING_STEPS = (1000, 800, 600, 400, 200)
KEY_FRAMES = 21


@dataclass
class InFlightChunk:
    index: int  # chunk number in the video
    level: int  # index into the sampler's timesteps
    latents: torch.Tensor  # [1, C, F, h, w] at that level's noise


class Rolling(SinkAndRecent):
    name = "rolling"
    positions = (0, math.inf)

    def __init__(self, chunk_frames: int = 3, window_chunks: int = 5, key_frames: int = KEY_FRAMES,
                 denoising_steps=ROLLING_STEPS, warp: bool = True):
        if window_chunks != len(denoising_steps):
            raise TetherError(f"rolling: a window of {window_chunks} chunks needs {window_chunks} denoising steps, "
                              f"got {len(denoising_steps)}")
        if key_frames < (window_chunks + 1) * chunk_frames:
            raise TetherError(f"rolling: key_frames={key_frames} leaves no room for the sink beside the window")
        self.window_chunks = window_chunks
        self.key_frames = key_frames
        self.denoising_steps = tuple(denoising_steps)
        self.warp = warp
        self.sink_frames = chunk_frames  # the first chunk
        super().__init__(chunk_frames)

    @property
    def max_frames(self) -> int:
        return self.key_frames - self.window_chunks * self.chunk_frames

    @property
    def recent_frames(self) -> int:
        return self.max_frames - self.chunk_frames

    def make_sampler(self, shift: float = DEFAULT_SHIFT) -> "RollingSampler":
        """The window sampler, on the noise levels of the model's schedule `shift`."""
        return RollingSampler(self.denoising_steps, shift, self.warp)

    def layout(self, num_query_frames: int) -> Layout:
        first_working = self.recent[0].index if self.recent else self.next_index
        return Layout(
            slots=self.sink + self.recent,
            key_positions=list(range(first_working - len(self.sink), first_working)) + [f.index for f in self.recent],
            query_positions=list(range(self.next_index, self.next_index + num_query_frames)),
        )



class RollingSampler:
    """Denoises a window of chunks at staggered noise levels; `next_chunk` returns the one that finishes."""

    def __init__(self, denoising_steps=ROLLING_STEPS, shift: float = DEFAULT_SHIFT, warp: bool = True):
        self.timesteps = warp_steps(denoising_steps, shift) if warp else [float(t) for t in denoising_steps]
        self.window = []  # InFlightChunk, oldest (least noisy) first

    def forwards_per_chunk(self) -> int:
        return 2  # once warm: one window forward, one commit

    def next_chunk(self, stream):
        while True:
            self._admit(stream)
            finished = self._denoise_window(stream)
            if finished is not None:
                return finished

    def _admit(self, stream) -> None:
        index = self.window[-1].index + 1 if self.window else stream.chunk_index
        self.window.append(InFlightChunk(index, 0, stream.noise(stream.chunk_frames)))

    def _denoise_window(self, stream):
        """One forward over the window; returns the finished chunk's clean latents, or None while warming up."""
        policy, model, frames = stream.policy, stream.model, stream.chunk_frames
        latents = torch.cat([c.latents for c in self.window], dim=2)
        timesteps = torch.tensor([self.timesteps[c.level] for c in self.window]).repeat_interleave(frames)
        view = policy.view(latents.shape[2], model.rotate_keys)
        stream.record_positions(view.layout)
        flow = self._forward(stream, latents, timesteps, view)

        finished, still_noisy = None, []
        for i, chunk in enumerate(self.window):
            part = slice(i * frames, (i + 1) * frames)
            t = self.timesteps[chunk.level]
            x0 = predict_x0(chunk.latents.float(), flow[:, :, part].float(), t)
            if chunk.level == len(self.timesteps) - 1:
                finished, finished_index = x0.to(chunk.latents.dtype), chunk.index
            else:
                noisy = add_noise(x0, stream.noise_like(x0), self.timesteps[chunk.level + 1])
                still_noisy.append(InFlightChunk(chunk.index, chunk.level + 1, noisy.to(chunk.latents.dtype)))
        self.window = still_noisy
        if finished is None:
            return None

        commit_view = policy.view(frames, model.rotate_keys)
        stream.record_positions(commit_view.layout)
        sampler.commit(stream, finished, commit_view, stream.text_for_chunk(finished_index))
        return finished

    def _forward(self, stream, latents, timesteps, view):
        """Flow for the whole window, each chunk under its own prompt."""
        texts = [stream.text_for_chunk(c.index) for c in self.window]
        prompts = list({id(t): t for t in texts}.values())
        if len(prompts) == 1:
            return stream.model.forward_cached(latents, timesteps[None], prompts[0], view.layout.query_positions,
                                               past=view)
        # The window straddles a prompt switch: one batch row per prompt.
        rows = len(prompts)
        text = TextContext([tuple(torch.cat(parts) for parts in zip(*(p.kv[layer] for p in prompts)))
                            for layer in range(len(prompts[0].kv))])
        flow = stream.model.forward_cached(latents.expand(rows, *latents.shape[1:]),
                                           timesteps[None].expand(rows, -1), text, view.layout.query_positions,
                                           past=_RepeatedView(view, rows))
        row_of = {id(p): r for r, p in enumerate(prompts)}
        frames = stream.chunk_frames
        return torch.cat([flow[row_of[id(t)]:row_of[id(t)] + 1, :, i * frames:(i + 1) * frames]
                          for i, t in enumerate(texts)], dim=2)

    def state_dict(self) -> dict:
        return {"window": [{"index": c.index, "level": c.level, "latents": c.latents} for c in self.window]}

    def load_state_dict(self, state: dict) -> None:
        self.window = [InFlightChunk(d["index"], d["level"], d["latents"]) for d in state.get("window", [])]


class _RepeatedView:
    """An attention view with its keys repeated over a batch of prompts."""

    def __init__(self, view, rows: int):
        self.view, self.rows, self.layout = view, rows, view.layout

    def __call__(self, layer: int):
        past = self.view(layer)
        return None if past is None else tuple(t.expand(self.rows, *t.shape[1:]) for t in past)
