"""`self-forcing`: Self-Forcing DMD [SF, SPEC §4].

Each step: when `trains_generator(step)` (every `generator_every`-th step,
from step 0), the generator rolls out a clip with its own KV cache
(`rollout.py`: one exit step shared by all ranks, gradients only at that
step and only for the last 21 latent frames) and takes the DMD loss against
the guided real score and the critic. Every step, the critic takes a flow-
matching step on a fresh, gradient-free rollout. Both optimisers are AdamW;
the generator's EMA is updated when the generator steps.

The logged `loss` is the critic's (the one computed every step);
`generator_loss` and `dmd_grad` (mean |DMD gradient|) appear on generator
steps.

Models: the generator from `model.source` (an ode-init export in a real
run), the real score from `teacher.source`, the critic from `critic.source`;
see `tether/train/dmd.py` for the fallbacks that let `model.source=tiny`
alone give a consistent run.

Rank invariance: every draw is made for the global batch from the shared
generator (rollout noise has one stream per global sample), so N ranks with
batch b compute what one rank with batch N*b does. Policies whose memory
depends on content (`dual`, `slow-fast`) roll out sample by sample, so each
video keeps its own memory as at inference (`rollout.per_sample_memory`).

Subclasses (Grounded Forcing) change the memory policy, the switch rule,
and what a rollout looks like (`plan`).
"""

from dataclasses import dataclass, field

import torch

from ...memory import make_policy
from ..data import make_data
from ..dmd import critic_loss, dmd_loss, dmd_timesteps, load_score, score_sources, trains_generator
from ..recipe import register_recipe
from ..rollout import GRAD_FRAMES, RolloutResult, SelfForcingRollout, Switch, draw_exit_step
from .distill_base import DistillationRecipe, GlobalDraws, clip_shape, draw_prompts


#: Policies whose memory depends on what was generated (anchor choice, promotion). With a batch
#: they would decide once for all samples (cosines averaged over the batch), unlike inference,
#: where every video keeps its own memory, and unlike a run with another split of the batch
#: over ranks. Their rollouts run sample by sample.
CONTENT_DEPENDENT_POLICIES = ("dual", "slow-fast")


@dataclass
class RolloutPlan:
    """Everything one rollout needs that is drawn at random (identically on every rank, sliced per rank)."""

    text: torch.Tensor
    num_frames: int
    exit_step: int
    draws: GlobalDraws
    switches: list = field(default_factory=list)


@register_recipe
class SelfForcing(DistillationRecipe):
    name = "self-forcing"
    default_policy = "full"
    default_switch = "text-reset"

    def setup(self):
        cfg = self.cfg
        self.setup_generator()
        teacher_source, critic_source = score_sources(cfg)
        trainer = self.trainer
        self.real_score = trainer.add_model("real_score", load_score(teacher_source, self.model_cfg, "teacher"),
                                            trainable=False)
        self.critic = trainer.add_model("critic", load_score(critic_source, self.model_cfg, "critic").train())
        trainer.add_optimizer_from_config("critic", self.critic, cfg.get("critic_optimizer", {}), 4e-7)
        self.data = make_data(cfg.get("data", {}), self.model_cfg)
        channels, frames, height, width = clip_shape(self.data)
        self.latent_shape = (channels, height, width)
        self.clip_frames = frames - frames % self.chunk_frames
        self.generator_every = int(cfg.get("generator_every", 5))
        self.guidance = float(cfg.get("guidance", 3.0))
        roll = cfg.get("rollout", {})
        self.policy_name = roll.get("policy", self.default_policy)
        self.policy_options = dict(roll.get("policy_options") or {})
        self.grad_frames = int(roll.get("grad_frames", GRAD_FRAMES))
        self.per_sample_memory = bool(roll.get("per_sample_memory", self.policy_name in CONTENT_DEPENDENT_POLICIES))
        self.rollout = SelfForcingRollout(self.denoising_steps, self.shift, self.chunk_frames, self.grad_frames,
                                          float(roll.get("context_noise", 0.0)), roll.get("switch", self.default_switch))

    # ---- what a rollout looks like -------------------------------------------
    def plan(self, step: int, micro: int, purpose: str) -> RolloutPlan:
        """Self-Forcing: one prompt, a clip of `data.frames` latent frames (whole chunks)."""
        draws = GlobalDraws(self.trainer, step, purpose, micro)
        text = draw_prompts(self.data, draws.generator, self.global_batch)
        exit_step = draw_exit_step(draws.generator, self.rollout.num_steps)
        return RolloutPlan(draws.share(text), self.clip_frames, exit_step, draws)

    def new_policy(self):
        return make_policy(self.policy_name, chunk_frames=self.chunk_frames, **self.policy_options)

    def roll(self, plan: RolloutPlan, grad: bool):
        noise = plan.draws.sample_noise(plan.text.shape[0])
        with torch.set_grad_enabled(grad):
            if not self.per_sample_memory:
                return self.rollout.run(self.generator, self.new_policy(), plan.text, noise, plan.num_frames,
                                        self.latent_shape, plan.exit_step, plan.switches, grad=grad)
            results = []
            for i, sample_noise in enumerate(noise.split()):
                switches = [Switch(s.chunk, s.text[i:i + 1], s.cut) for s in plan.switches]
                results.append(self.rollout.run(self.generator, self.new_policy(), plan.text[i:i + 1], sample_noise,
                                                plan.num_frames, self.latent_shape, plan.exit_step, switches, grad=grad))
            return RolloutResult.stack(results)

    def score_draws(self, draws: GlobalDraws, window):
        """DMD timesteps [B] and noise for a window, from the rollout's own shared stream."""
        world = self.trainer.world_size
        timesteps = draws.share(dmd_timesteps(draws.generator, window.shape[0] * world, self.shift))
        return timesteps, draws.noise(window.shape).to(window.device, window.dtype)

    # ---- a step ------------------------------------------------------------------
    def scored(self, plan: RolloutPlan, grad: bool):
        """Roll out and return (window, segments, real score, fake score): what DMD compares.

        Context Forcing's stage 2 overrides this to condition both scores on the student's memory.
        """
        window, segments = self.roll(plan, grad=grad).window(self.grad_frames)
        return window, segments, self.real_score, self.critic

    def generator_step(self, step: int) -> dict:
        trainer = self.trainer
        loss_total = grad_total = 0.0
        for micro in range(trainer.accumulation):
            plan = self.plan(step, micro, "generator")
            with trainer.autocast():
                window, segments, real, fake = self.scored(plan, grad=True)
                timesteps, noise = self.score_draws(plan.draws, window)
                loss, grad_size = dmd_loss(window, real, fake, timesteps, noise, self.guidance, segments)
            trainer.backward(loss, self.generator, micro)
            loss_total += loss.item() / trainer.accumulation
            grad_total += grad_size / trainer.accumulation
        grad_norm = trainer.optimizer_step("generator", step)
        return {"generator_loss": loss_total, "dmd_grad": grad_total, "generator_grad_norm": grad_norm}

    def critic_step(self, step: int) -> dict:
        trainer = self.trainer
        total = 0.0
        for micro in range(trainer.accumulation):
            plan = self.plan(step, micro, "critic")
            with trainer.autocast():
                window, segments, _, fake = self.scored(plan, grad=False)
                timesteps, noise = self.score_draws(plan.draws, window)
                loss = critic_loss(fake, window, timesteps, noise, segments)
            trainer.backward(loss, self.critic, micro)
            total += loss.item() / trainer.accumulation
        return {"loss": total, "critic_grad_norm": trainer.optimizer_step("critic", step)}

    def step(self, step: int) -> dict:
        metrics = self.generator_step(step) if trains_generator(step, self.generator_every) else {}
        return {**self.critic_step(step), **metrics}
