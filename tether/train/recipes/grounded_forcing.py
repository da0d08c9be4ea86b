"""`gf-stage1` and `gf-stage2`: Grounded Forcing's two training stages [GF, SPEC §3-4].

The paper publishes neither loss nor code; its lineage default is
Self-Forcing DMD, so both stages are `self-forcing` with Grounded Forcing's
memory in the rollout:

- Stage 1 (1200 steps): short clips, rolled out through the `dual` memory
  (anchors at RoPE index 0, local frames and the current chunk bounded in
  [0, 20]: DR-RoPE is the dual policy's layout), so the generator learns to
  work from that memory from the first chunk.
- Stage 2 (1000 steps): long rollouts (`rollout.frames: [min, max]` latent
  frames, whole chunks, length drawn per rollout) with 1..`max_switches`
  prompt switches at random chunk boundaries, applied with APR (the dual
  policy's switch rule), each one a scene cut with probability
  `cut_probability` (the LTM is flushed, the anchors stay). The last 21
  latent frames are supervised, as in LongLive's streaming long tuning; when
  a switch falls inside them, every frame is scored under the prompt it was
  generated under (`dmd.per_segment`). Across a scene cut inside the window
  the bidirectional scores still see both shots, each frame under its own
  prompt: the scores keep the 21-frame clip they are trained on (the
  alternative, scoring each shot alone, gives them fragments). Our choice;
  the paper says nothing.

All draws (length, switch chunks, their prompts, cuts) come from the shared
generator, so every rank rolls out the same schedule.
"""

import torch

from ..recipe import register_recipe
from ..rollout import Switch
from .distill_base import draw_prompts
from .self_forcing import SelfForcing


@register_recipe
class GroundedForcingStage1(SelfForcing):
    name = "gf-stage1"
    default_policy = "dual"
    default_switch = "apr"


@register_recipe
class GroundedForcingStage2(GroundedForcingStage1):
    name = "gf-stage2"

    def setup(self):
        super().setup()
        roll = self.cfg.get("rollout", {})
        low, high = roll.get("frames", [42, 84])
        self.min_chunks = max(1, int(low) // self.chunk_frames)
        self.max_chunks = max(self.min_chunks, int(high) // self.chunk_frames)
        self.max_switches = int(roll.get("max_switches", 1))
        self.cut_probability = float(roll.get("cut_probability", 0.2))

    def plan(self, step: int, micro: int, purpose: str):
        plan = super().plan(step, micro, purpose)
        g = plan.draws.generator
        chunks = int(torch.randint(self.min_chunks, self.max_chunks + 1, (1,), generator=g))
        plan.num_frames = chunks * self.chunk_frames
        if chunks < 2:
            return plan
        count = int(torch.randint(1, self.max_switches + 1, (1,), generator=g))
        at = sorted((1 + torch.randperm(chunks - 1, generator=g)[:count]).tolist())
        for chunk in at:
            text = draw_prompts(self.data, g, self.global_batch)
            cut = bool(torch.rand(1, generator=g) < self.cut_probability)
            plan.switches.append(Switch(chunk, plan.draws.share(text), cut))
        return plan
