"""`cf-stage1` and `cf-stage2`: Context Forcing's two distillation stages [CF, SPEC §4].

Both are Self-Forcing DMD (`self_forcing.py`, `dmd.py`, `rollout.py`) with the
student rolling out through its slow-fast memory (sink 3 + slow 12 + fast 6,
bounded positions in [0, 20]).

- Stage 1 (600 iterations, guidance 3): short rollouts of 1-5 s
  (`rollout.frames: [6, 21]` latent frames, whole chunks, drawn per rollout),
  each judged whole by the ordinary short teacher, so the student learns to
  generate from its slow-fast memory before it has to remember far back.
- Stage 2, Contextual DMD (500 iterations, guidance 5): long rollouts; the
  last 21 latent frames are the target and the student's own earlier output
  is the context. The real score (the `cf-teacher` export) and the critic
  both see [clean context ‖ noisy target] (`ContextualScore`); the DMD and
  critic losses themselves are `dmd.py`'s, unchanged. The rollout length
  follows a curriculum: the longest allowed grows linearly from
  `rollout.frames[0]` to `rollout.frames[1]` over `curriculum_steps` (600)
  steps and each rollout's length is uniform (whole chunks) up to it. With
  500 iterations the curriculum stops at 5/6 of its way, as published.

Stage 2's context (`context`):
- `memory` (the paper): the teacher sees what the student's memory held when
  the target began: its sink and slow frames, then the 6 frames just before
  the target (the cf-teacher's "motion" latents, which include the student's
  fast frames; a slow frame among them is not repeated; a slow frame that
  `promotion: code` shows to some layers only is shown whole). Positions are the
  cf-teacher's bounded layout (`cf_teacher.context_positions`), which is what
  the teacher was fine-tuned on.
- `slice` (the public code): the 21 contiguous latents before the target
  (fewer early on), packed right before it. The public code re-encodes the
  first of them through the VAE; tether trains on latents and does not.

Models: generator `model.source` (stage 1: an ode-init or self-forcing
export; stage 2: the stage-1 export), real score `teacher.source` (stage 1:
the short teacher; stage 2: the cf-teacher export), critic `critic.source`;
unset sources follow `model.source` (see `dmd.score_sources`).

Learning-rate schedule: the generator steps every `generator_every`-th
iteration, and the trainer's schedules count optimiser steps, so the
generator's cosine runs over ceil(steps / generator_every) updates
(`optimizer.horizon`, filled in here unless set) to end at 0.2x as published.
"""

import math

import torch

from ..recipe import register_recipe
from ..rollout import GRAD_FRAMES
from .cf_teacher import MOTION, SPARSE, SINK, context_positions
from .self_forcing import SelfForcing

CONTEXTS = ("memory", "slice")


def chunk_range(frames, chunk_frames: int) -> tuple:
    """[min, max] latent frames as whole chunks (at least one)."""
    low, high = frames
    low_chunks = max(1, math.ceil(int(low) / chunk_frames))
    return low_chunks, max(low_chunks, int(high) // chunk_frames)


class ContextualScore:
    """A bidirectional model that sees clean context frames (timestep 0) before the noisy frames it scores.

    It offers `forward_bidirectional(noisy, timesteps [B], text)` like a plain
    score and returns the flow on the noisy frames only, so `dmd.py`'s losses
    use it unchanged. Each sample has its own context ([1, C, n_i, h, w]) and
    positions: with per-sample memories the student remembers different
    frames in each video. Samples that share a layout run as one batch. A
    batch that stacks copies of the samples (as guidance stacks cond and
    uncond) gives copy k of sample i sample i's context.
    """

    def __init__(self, model, contexts: list, positions: list):
        self.model = model
        self.contexts = [c.detach() for c in contexts]
        self.positions = [list(p) for p in positions]

    def forward_bidirectional(self, noisy, timesteps, text, frame_positions=None):
        timesteps = torch.as_tensor(timesteps, device=noisy.device).float().view(-1)
        samples = len(self.contexts)
        groups = {}  # one forward per distinct layout
        for row in range(noisy.shape[0]):
            groups.setdefault(tuple(self.positions[row % samples]), []).append(row)
        flow = torch.empty_like(noisy)
        for positions, rows in groups.items():
            context = torch.cat([self.contexts[row % samples] for row in rows]).to(noisy)
            flow[rows] = self._run(context, list(positions), noisy[rows], timesteps[rows], text[rows]).to(flow.dtype)
        return flow

    def _run(self, context, positions, noisy, timesteps, text):
        batch, num_context, frames = noisy.shape[0], context.shape[2], noisy.shape[2]
        frame_t = torch.cat([torch.zeros(batch, num_context, device=noisy.device),
                             timesteps[:, None].expand(batch, frames)], dim=1)
        flow = self.model.forward_bidirectional(torch.cat([context, noisy], dim=2), frame_t, text,
                                                frame_positions=torch.tensor(positions))
        return flow[:, :, num_context:]


class MemoryRecorder:
    """A memory policy, unchanged, that notes which frames it holds when frame `at` is about to be generated."""

    def __init__(self, policy, at: int):
        self.policy = policy
        self.at = at
        self.held = None

    def view(self, num_query_frames: int, rotate):
        if self.policy.next_index == self.at:
            self.held = {group: [f.index for f in getattr(self.policy, group)] for group in self.policy.frame_groups}
        return self.policy.view(num_query_frames, rotate)

    def __getattr__(self, name):
        return getattr(self.policy, name)


def memory_context(held: dict, target_start: int, motion: int = MOTION) -> tuple:
    """Context frame indices and how many are sink, from the student's memory at the target's start (paper layout)."""
    motion_frames = list(range(max(0, target_start - motion), target_start))
    sink = [i for i in held.get("sink", []) if i not in motion_frames]
    slow = [i for i in held.get("slow", []) if i not in motion_frames and i not in sink][-SPARSE:]
    return sink + slow + motion_frames, len(sink)


def slice_context(target_start: int, frames: int = GRAD_FRAMES) -> tuple:
    """The `frames` latents just before the target (public code), none of them a sink."""
    return list(range(max(0, target_start - frames), target_start)), 0


@register_recipe
class ContextForcingStage1(SelfForcing):
    name = "cf-stage1"
    default_policy = "slow-fast"
    default_frames = (6, 21)

    def setup(self):
        cfg = self.cfg
        opt = cfg.setdefault("optimizer", {})
        if opt.get("horizon") is None:
            opt["horizon"] = math.ceil(int(cfg.get("steps", 1)) / int(cfg.get("generator_every", 5)))
        super().setup()
        roll = cfg.get("rollout", {})
        self.min_chunks, self.max_chunks = chunk_range(roll.get("frames", self.default_frames), self.chunk_frames)

    def longest_chunks(self, step: int) -> int:
        return self.max_chunks

    def plan(self, step: int, micro: int, purpose: str):
        plan = super().plan(step, micro, purpose)
        high = self.longest_chunks(step)
        plan.num_frames = self.chunk_frames * int(torch.randint(self.min_chunks, high + 1, (1,), generator=plan.draws.generator))
        return plan


@register_recipe
class ContextForcingStage2(ContextForcingStage1):
    name = "cf-stage2"
    default_frames = (42, 120)

    def setup(self):
        super().setup()
        self.curriculum_steps = int(self.cfg.get("curriculum_steps", 600))
        self.context = self.cfg.get("context", "memory")
        if self.context not in CONTEXTS:
            from ...errors import TetherError

            raise TetherError(f"unknown context '{self.context}' for cf-stage2 (known: {', '.join(CONTEXTS)})")

    def longest_chunks(self, step: int) -> int:
        """The curriculum: from the shortest to the longest rollout, linearly over `curriculum_steps`."""
        progress = min(1.0, step / max(1, self.curriculum_steps))
        return self.min_chunks + int(progress * (self.max_chunks - self.min_chunks))

    def target_frames(self, num_frames: int) -> int:
        """21 frames, or fewer when a rollout is too short to leave at least a chunk of context."""
        return max(self.chunk_frames, min(self.grad_frames, num_frames - self.chunk_frames))

    def new_policy(self):
        """The student's memory, watched so that the teacher can be shown what it held (one per rollout)."""
        recorder = MemoryRecorder(super().new_policy(), self._target_start)
        self._recorders.append(recorder)
        return recorder

    def roll(self, plan, grad: bool):
        self._target_start = plan.num_frames - self.target_frames(plan.num_frames)
        self._recorders = []
        result = super().roll(plan, grad)
        # one memory for the whole batch, or one per sample (`rollout.per_sample_memory`)
        result.memory = [recorder.held or {} for recorder in self._recorders]
        return result

    def contextual(self, result):
        """The target window, its prompt segments, and the real score and critic seeing its context."""
        frames = result.latents.shape[2]
        target_start = frames - self.target_frames(frames)
        window, segments = result.window(frames - target_start)
        contexts, positions = [], []
        for sample in range(window.shape[0]):
            if self.context == "memory":
                held = result.memory[sample] if len(result.memory) > 1 else result.memory[0]
                indices, num_sink = memory_context(held, target_start)
            else:
                indices, num_sink = slice_context(target_start)
            contexts.append(result.latents[sample:sample + 1, :, indices].detach())
            positions.append(context_positions(num_sink, len(indices) - num_sink, target_start, window.shape[2],
                                               top=SINK + SPARSE + MOTION))
        return (window, segments, ContextualScore(self.real_score, contexts, positions),
                ContextualScore(self.critic, contexts, positions))

    def scored(self, plan, grad: bool):
        return self.contextual(self.roll(plan, grad=grad))
