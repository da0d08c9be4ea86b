"""Self-Forcing's training rollout: the generator makes its own context, with gradients [SF, SPEC §4].

The generator produces a clip chunk by chunk exactly as at inference: its
own KV cache through a memory policy, few-step denoising per chunk, a clean
commit pass after each chunk. Training differs in one thing: the rollout
stops at one exit step, drawn once per rollout from the shared generator so
every rank stops at the same step (ranks that disagreed would run different
numbers of forwards and deadlock FSDP's collectives). The exit step's x0 is
the chunk's output.

Where gradients flow, and why:

- Only the exit step's forward keeps a graph. Earlier steps produce the
  exit step's input and are treated as data: backpropagating through all
  of them would multiply memory by the number of steps for a signal DMD
  does not need.
- Only chunks in the last `grad_frames` (21) latent frames keep it. A long
  rollout would otherwise hold one graph per chunk; 21 frames is the clip the
  real and fake scores judge.
- Commit passes run without gradients, so the cache holds constants and a
  chunk's loss does not reach back into earlier chunks through their K/V.

Prompt switches (`Switch`) take effect at a chunk boundary through a switch
rule (`kv-recache`, `apr`, ...), exactly as in `Stream`; a scene cut first
lets the policy flush what it flushes on a cut. Switch rules see a
`RolloutStream`, which has the parts of a `Stream` they use.
"""

from dataclasses import dataclass, field

import torch

from ..errors import TetherError
from ..memory.switch import make_switch_rule
from ..sampler import frames_from_capture
from ..schedule import add_noise, predict_x0, warp_steps
from ..stream import Stream

#: The clip length the scores judge and the gradient window [SF].
GRAD_FRAMES = 21


@dataclass
class Switch:
    """From chunk `chunk` on, the prompt is `text` [B, L, text_dim]; `cut` marks a scene cut."""

    chunk: int
    text: torch.Tensor
    cut: bool = False


@dataclass
class RolloutResult:
    """`latents` [B, C, F, h, w]: frames from `grad_start` on carry the exit step's graph (when asked for).

    `segments` lists (first frame, text) of every prompt in force, in order.
    """

    latents: torch.Tensor
    exit_step: int
    grad_start: int
    segments: list = field(default_factory=list)

    @staticmethod
    def stack(results: list) -> "RolloutResult":
        """One result from per-sample rollouts of the same plan (same length, switches and exit step)."""
        segments = [(first, torch.cat([r.segments[i][1] for r in results]))
                    for i, (first, _) in enumerate(results[0].segments)]
        return RolloutResult(torch.cat([r.latents for r in results]), results[0].exit_step, results[0].grad_start,
                             segments)

    def window(self, frames: int = GRAD_FRAMES):
        """The last `frames` latent frames and the prompts in force over them, frame numbers relative to it."""
        start = max(0, self.latents.shape[2] - frames)
        return self.latents[:, :, start:], segments_from(self.segments, start)


def segments_from(segments: list, start: int) -> list:
    """The (first frame, text) segments seen from frame `start` on, renumbered from 0."""
    inside = [(max(0, first - start), text) for first, text in segments]
    kept = []
    for first, text in inside:
        if kept and kept[-1][0] == first:  # a segment that ends before `start` is replaced by the next
            kept[-1] = (first, text)
        else:
            kept.append((first, text))
    return kept


def draw_exit_step(shared_generator: torch.Generator, num_steps: int) -> int:
    """The denoising step a rollout stops at: uniform, from randomness every rank draws alike."""
    return int(torch.randint(num_steps, (1,), generator=shared_generator))


class RolloutStream:
    """What switch rules use of a `Stream`: the model, the policy, the chunk size and re-encoding."""

    def __init__(self, model, policy, chunk_frames: int):
        self.model = model
        self.policy = policy
        self.chunk_frames = chunk_frames

    # The recache path is the inference one (no gradients, chunk-causal), so a trained
    # generator meets at inference the same re-encoded K/V it was trained on.
    reencode = Stream.reencode


class SelfForcingRollout:
    def __init__(self, denoising_steps=(1000, 750, 500, 250), shift: float = 5.0, chunk_frames: int = 3,
                 grad_frames: int = GRAD_FRAMES, context_noise: float = 0.0, switch="text-reset"):
        self.timesteps = warp_steps(denoising_steps, shift)
        self.chunk_frames = chunk_frames
        self.grad_frames = grad_frames
        self.context_noise = context_noise
        self.switch = switch

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    def run(self, model, policy, text, noise, num_frames: int, latent_shape, exit_step: int, switches=(),
            grad: bool = True) -> RolloutResult:
        """Roll out `num_frames` latent frames.

        text [B, L, text_dim]: the first prompt (raw embeddings, so that a sharded
            model turns them into K/V inside its gathered blocks);
        noise(shape) -> tensor on the model's device: every Gaussian draw (the caller makes it rank-consistent);
        latent_shape (C, h, w); policy: a fresh `MemoryPolicy`;
        switches: `Switch`es or (chunk, text[, cut]) tuples, at most one per chunk, chunk >= 1
            (the prompt of chunk 0 is `text`).
        """
        if num_frames % self.chunk_frames:
            raise ValueError(f"a rollout of {num_frames} frames is not a whole number of {self.chunk_frames}-frame chunks")
        if hasattr(policy, "make_sampler"):
            raise TetherError(f"policy '{policy.name}' samples its own way (several chunks in flight); the Self-Forcing "
                              f"rollout denoises one chunk at a time")
        rule = make_switch_rule(self.switch)
        rule.check(policy)
        stream = RolloutStream(model, policy, self.chunk_frames)
        batch = text.shape[0]
        channels, height, width = latent_shape
        _, ph, pw = model.config.patch_size
        grid = (height // ph, width // pw)
        grad_start = max(0, num_frames - self.grad_frames) if grad else num_frames
        switches = [s if isinstance(s, Switch) else Switch(*s) for s in switches]  # (chunk, text[, cut]) too
        pending = {s.chunk: s for s in switches}
        segments = [(0, text)]
        chunks = []
        for chunk in range(num_frames // self.chunk_frames):
            first = chunk * self.chunk_frames
            if chunk in pending and chunk > 0:
                text = self._switch(stream, rule, pending[chunk])
                segments.append((first, text))
            view = policy.view(self.chunk_frames, model.rotate_keys)
            x = noise((batch, channels, self.chunk_frames, height, width))
            x0 = self._denoise(model, view, text, x, exit_step, noise, keep_graph=first >= grad_start)
            self._commit(model, policy, view, text, x0.detach(), noise, grid)
            chunks.append(x0)
        return RolloutResult(torch.cat(chunks, dim=2), exit_step, grad_start, segments)

    def _switch(self, stream, rule, switch: Switch):
        if switch.cut:
            stream.policy.on_scene_cut()
        with torch.no_grad():
            rule.apply(stream, switch.text, cut=switch.cut)
        return switch.text

    def _denoise(self, model, view, text, x, exit_step: int, noise, keep_graph: bool):
        for i, t in enumerate(self.timesteps[:exit_step + 1]):
            exiting = i == exit_step
            with torch.set_grad_enabled(keep_graph and exiting):
                flow = model.forward_cached(x, t, text, view.layout.query_positions, past=view)
                x0 = predict_x0(x.float(), flow.float(), t)
            if not exiting:
                x = add_noise(x0, noise(x0.shape).to(x0), self.timesteps[i + 1]).to(x.dtype)
        return x0

    @torch.no_grad()
    def _commit(self, model, policy, view, text, x0, noise, grid):
        t = self.context_noise
        x_in = x0 if t == 0 else add_noise(x0, noise(x0.shape).to(x0), t)
        _, captured = model.forward_cached(x_in, t, text, view.layout.query_positions, past=view, capture=True)
        policy.commit(frames_from_capture(captured, x0, policy.next_index, grid))
        policy.advance(x0.shape[2])
