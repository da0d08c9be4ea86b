"""One video being generated, chunk by chunk.

A `Stream` ties together the model, a memory policy, a sampler and the
prompt in force. `step()` makes the next chunk; `set_prompt()` switches the
prompt at the next chunk boundary (applying the switch rule), which is all an
interactive front end needs. `run(timeline)` drives it from a timeline.

Randomness comes from one CPU generator seeded once, so a stream is
deterministic on CPU and draws the same noise on any device.
"""

from collections import OrderedDict

import torch

from .memory.switch import make_switch_rule
from .model.transformer import TextContext
from .sampler import FewStepSampler, frames_from_capture
from .schedule import DEFAULT_SHIFT


class Stream:
    def __init__(self, model, policy, encode_prompt, latent_shape, sampler=None, switch=None, seed: int = 0,
                 context_noise: float = 0.0, chunk_frames: int = 3, on_layout=None, shift: float = DEFAULT_SHIFT):
        """`encode_prompt(str) -> text embeddings [1, L, text_dim]`; latent_shape = (C, h, w).

        `shift` is the timestep shift the model was trained with (the pipeline's); it places the
        sampler's few denoising steps on the same noise levels the model learnt them at.
        """
        self.model = model
        self.policy = policy
        self.encode_prompt = encode_prompt
        self.latent_shape = tuple(latent_shape)
        if sampler is None:
            sampler = policy.make_sampler(shift) if hasattr(policy, "make_sampler") else FewStepSampler(shift=shift)
        self.sampler = sampler
        self.switch_rule = make_switch_rule(switch or policy.default_switch)
        self.switch_rule.check(policy)
        self.context_noise = context_noise
        self.chunk_frames = chunk_frames
        self.on_layout = on_layout
        _, ph, pw = model.config.patch_size
        self.token_grid = (latent_shape[1] // ph, latent_shape[2] // pw)
        self.rng = torch.Generator().manual_seed(seed)
        self.chunk_index = 0
        self.prompt = None
        self.timeline = None
        self._pending = None
        self._text_cache = OrderedDict()

    # ---- what samplers and switch rules use ------------------------------
    @property
    def device(self):
        return self.model.device

    def noise(self, num_frames: int) -> torch.Tensor:
        shape = (1, self.latent_shape[0], num_frames, *self.latent_shape[1:])
        return torch.randn(shape, generator=self.rng).to(self.device, self.model.dtype)

    def noise_like(self, x: torch.Tensor) -> torch.Tensor:
        return torch.randn(x.shape, generator=self.rng).to(x.device, x.dtype)

    #: prompts whose text K/V stay cached; at 1.3B one prompt's K/V is ~94 MB in bf16, and an
    #: interactive session may see hundreds of prompts. Four covers the prompt in force, a
    #: pending switch and a look-ahead sampler's window.
    TEXT_CACHE_SIZE = 4

    def text_context(self, prompt: str) -> TextContext:
        if prompt in self._text_cache:
            self._text_cache.move_to_end(prompt)
        else:
            with torch.no_grad():
                embeddings = self.encode_prompt(prompt).to(self.device)
                self._text_cache[prompt] = self.model.encode_text(embeddings)
            while len(self._text_cache) > self.TEXT_CACHE_SIZE:
                self._text_cache.popitem(last=False)
        return self._text_cache[prompt]

    def text_for_chunk(self, chunk_index: int) -> TextContext:
        """The prompt of a (possibly future) chunk: samplers that look ahead need it."""
        prompt = self.prompt
        if self.timeline is not None and chunk_index > self.chunk_index:
            _, segment = self.timeline.segment_at(min(chunk_index, self.timeline.num_chunks - 1))
            prompt = segment.prompt
        return self.text_context(prompt)

    def record_positions(self, layout) -> None:
        if self.on_layout is not None:
            self.on_layout(self, layout)

    def reencode(self, frames: list, positions: list, text_ctx: TextContext, past=None) -> list:
        """Clean K/V of already generated frames under another prompt.

        The frames are re-run chunk-causally, as they were generated (LongLive's
        recache uses the same block-wise causal mask): chunk i of the block
        sees `past` and chunks <= i. So re-encoding under the same prompt and
        the same context reproduces the cache exactly.
        """
        latents = torch.stack([f.latent for f in frames], dim=2)
        with torch.no_grad():
            _, captured = self.model.forward_cached(latents, 0.0, text_ctx, positions, past=past, capture=True,
                                                    chunk_size=self.chunk_frames)
        fresh = frames_from_capture(captured, latents, 0, frames[0].grid)
        return [f.replaced(k=n.k, v=n.v) for f, n in zip(frames, fresh)]

    # ---- driving ---------------------------------------------------------
    def set_prompt(self, prompt: str, cut: bool = False) -> None:
        """Use `prompt` from the next chunk on; `cut` marks a scene cut."""
        if self.prompt is None:
            self.prompt = prompt
            self.text_context(prompt)
            return
        self._pending = (prompt, cut)

    def _apply_pending_switch(self) -> None:
        if self._pending is None:
            return
        prompt, cut = self._pending
        self._pending = None
        old = self.prompt
        self.prompt = prompt
        if cut:
            self.policy.on_scene_cut()
        if prompt != old or cut:
            self.switch_rule.apply(self, self.text_context(prompt), cut=cut)

    @torch.no_grad()
    def step(self) -> torch.Tensor:
        """Generate the next chunk; returns its clean latents [1, C, F, h, w]."""
        if self.prompt is None:
            raise RuntimeError("set_prompt() before step()")
        self._apply_pending_switch()
        latents = self.sampler.next_chunk(self)
        self.chunk_index += 1
        return latents

    def run(self, timeline):
        """Yield (chunk_index, segment_index, latents) for every chunk of a timeline.

        Starts at `chunk_index`, so a restored stream carries on where it stopped.
        """
        self.timeline = timeline
        starts = timeline.starts()
        for chunk in range(self.chunk_index, timeline.num_chunks):
            segment_index, segment = timeline.segment_at(chunk)
            if chunk in starts:
                self.set_prompt(segment.prompt, cut=segment.cut and chunk > 0)
            yield chunk, segment_index, self.step()

    # ---- resuming --------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "policy": self.policy.state_dict(),
            "sampler": self.sampler.state_dict() if hasattr(self.sampler, "state_dict") else {},
            "rng": self.rng.get_state(),
            "chunk_index": self.chunk_index,
            "prompt": self.prompt,
            "pending": self._pending,
        }

    def load_state_dict(self, state: dict) -> None:
        self.policy.load_state_dict(state["policy"])
        if hasattr(self.sampler, "load_state_dict"):
            self.sampler.load_state_dict(state["sampler"])
        self.rng.set_state(state["rng"])
        self.chunk_index = state["chunk_index"]
        self.prompt = state["prompt"]
        self._pending = state["pending"]
