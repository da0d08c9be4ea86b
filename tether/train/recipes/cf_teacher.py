"""`cf-teacher`: Context Forcing's long-context teacher, fine-tuned with error recycling.

A bidirectional teacher that scores 21 target latents given what a slow-fast
student remembers: [sink 3 | up to 12 sparse context latents | 6 recent
"motion" latents | 21 noisy target latents]. Context frames run at timestep
0, the target at t; the flow-matching loss covers the target only. ERFT
(`tether.train.error_bank`) adds the model's own past residuals to the motion
latents, the clean target and the noise, so the teacher learns to recover the
right velocity from a drifted history.

Layout (`plan_layout`), taken from one long clip whose frames end at `end`:
- target: the last min(21, ...) frames; the sink: the clip's first 3 frames;
  motion: the 6 frames just before the target; sparse context: one frame per
  6 latent frames (24 video frames) counting back from the motion frames, at
  most 12 (18 s), never reaching into the sink.
- A short clip degrades gracefully: the context (sink, then motion) takes at
  most half of it, the target the rest, and the sparse context only what
  lies between sink and motion. `data.frames=6` gives [sink 3 | target 3].
- With `random_history` the end of the window is drawn per step (shared by
  the batch), so the teacher also sees the short histories of a video's
  first seconds, as the student's memory does.

Temporal positions (`context_positions`) follow the slow-fast policy's
bounded layout: sink at 0..2, the other context frames contiguous and ending
just before the target, the target starting at min(its absolute frame index,
21); 21 is the memory's size (3 + 12 + 6), the student's context range
[0, 20]. So the context positions are exactly the student's, distances are
exact while the history is short (as the student's early chunks), and a full
layout is sink 0-2, sparse 3-14, motion 15-20, target 21-41.

The target velocity under error injection: v* = (x~_t - x0) / sigma, with x~_t
built from the perturbed target and noise and x0 the clean target, i.e. the
velocity whose one-step x0 estimate lands on the clean target (with no error
it is the usual noise - x0). Errors come from the bin of the sample's own
timestep, where their size scales with sigma, so the 1/sigma stays bounded.

LoRA (`lora: {rank, alpha, target_modules}`; the public code uses rank 128)
is injected with peft into the attention projections q, k, v, o by default;
`lora: null` fine-tunes everything (the toy scale). The base model is
`model.source`; the export merges the adapters into plain weights.
"""

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from ...checkpoints import save_transformer
from ..lora import add_lora, lora_scale, merge_lora
from ..error_bank import ErrorBank, InjectionRates, draw_errors, draw_injection
from ..recipe import register_recipe
from .teacher import Teacher, sample_timesteps

SINK, SPARSE, STRIDE, MOTION, TARGET = 3, 12, 6, 6, 21


@dataclass
class ContextLayout:
    """Clip frame indices of each part, and the temporal position of every input frame (in part order)."""

    sink: list
    sparse: list
    motion: list
    target: list
    positions: list = field(default_factory=list)

    @property
    def context(self) -> list:
        return self.sink + self.sparse + self.motion

    @property
    def frames(self) -> list:
        return self.context + self.target


def context_positions(num_sink: int, num_rest: int, target_start: int, num_target: int, top: int = SINK + SPARSE + MOTION):
    """Bounded positions: sink at 0.., the rest contiguous before the target, target from min(target_start, top)."""
    first_target = min(target_start, top)
    return (list(range(num_sink)) + list(range(first_target - num_rest, first_target))
            + list(range(first_target, first_target + num_target)))


def plan_layout(end: int, sink: int = SINK, sparse: int = SPARSE, stride: int = STRIDE, motion: int = MOTION,
                target: int = TARGET) -> ContextLayout:
    """Which frames of a clip's first `end` frames go where (see the module docstring)."""
    num_target = min(target, end - min(end // 2, sink + motion))
    target_start = end - num_target
    num_sink = min(sink, target_start)
    num_motion = min(motion, target_start - num_sink)
    motion_start = target_start - num_motion
    sparse_frames = [i for i in range(motion_start - stride, num_sink - 1, -stride)][:sparse][::-1]
    layout = ContextLayout(list(range(num_sink)), sparse_frames, list(range(motion_start, target_start)),
                           list(range(target_start, end)))
    layout.positions = context_positions(num_sink, len(sparse_frames) + num_motion, target_start, num_target,
                                         top=sink + sparse + motion)
    return layout


def smallest_full_window(sink=SINK, sparse=SPARSE, stride=STRIDE, motion=MOTION, target=TARGET) -> int:
    """The fewest clip frames that give the full layout (102 with the defaults)."""
    return sink + sparse * stride + motion + target


@dataclass
class TeacherInputs:
    latents: torch.Tensor  # [B, C, context + target frames, h, w]: clean context, then the noisy target
    timesteps: torch.Tensor  # [B, frames]: 0 on the context, t on the target
    velocity: torch.Tensor  # [B, C, target frames, h, w]: what the teacher must predict on the target


def teacher_inputs(clips, layout: ContextLayout, timesteps, noise, errors: dict) -> TeacherInputs:
    """One batch's input and target for `layout`, with ERFT's errors (zeros where none is injected).

    Only the motion latents, the clean target and the noise take errors: the
    sink and the sparse context go in exactly as they are in the clip.
    """
    target = clips[:, :, layout.target]
    sigma = (timesteps / 1000.0).view(-1, 1, 1, 1, 1)
    noise_in = noise + errors["noise"]
    noisy = (1 - sigma) * (target + errors["target"]) + sigma * noise_in
    # (noisy - target) / sigma, written so that no cancellation happens at small sigma
    velocity = noise_in - target + (1 - sigma) / sigma * errors["target"]
    latents = torch.cat([clips[:, :, layout.sink], clips[:, :, layout.sparse],
                         clips[:, :, layout.motion] + errors["motion"], noisy], dim=2)
    size, num_context = len(timesteps), len(layout.context)
    frame_t = torch.cat([torch.zeros(size, num_context), timesteps[:, None].float().expand(size, len(layout.target))], dim=1)
    return TeacherInputs(latents, frame_t, velocity)


def gather_batch(trainer, tensor: torch.Tensor) -> torch.Tensor:
    """This rank's rows of a batch, put back together from every rank (the inverse of `my_share`)."""
    if trainer.world_size == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(trainer.world_size)]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


@register_recipe
class ContextTeacher(Teacher):
    name = "cf-teacher"

    def prepare_model(self, model):
        self.lora = self.cfg.get("lora")
        return add_lora(model, self.lora) if self.lora else model

    def setup(self):
        super().setup()
        cfg = self.cfg
        self.random_history = bool(cfg.get("random_history", True))
        erft = cfg.get("erft", {})
        self.erft = bool(erft.get("enabled", True))
        self.rates = InjectionRates.from_config(erft.get("rates"))
        dtype = getattr(torch, erft.get("dtype", "float32"))
        self.bank = self.trainer.add_state("error_bank", ErrorBank(int(erft.get("bins", 50)), int(erft.get("capacity", 500)), dtype))

    def window_end(self, generator, clip_frames: int) -> int:
        """Where this step's window ends in the clip: anywhere from a one-chunk history to the whole clip."""
        if not self.random_history:
            return clip_frames
        shortest = min(clip_frames, SINK + MOTION + TARGET)
        return int(torch.randint(shortest, clip_frames + 1, (1,), generator=generator))

    def step(self, step: int) -> dict:
        total = 0.0
        trainer = self.trainer
        size = self.batch_size * trainer.world_size
        share = trainer.my_share
        for micro in range(trainer.accumulation):
            g = trainer.shared_generator(step, "batch", micro)
            clips, text = self.data.batch(g, size)
            keep = (torch.rand(size, generator=g) >= self.text_dropout).float().view(-1, 1, 1)
            layout = plan_layout(self.window_end(g, clips.shape[2]))
            timesteps = sample_timesteps(g, size, self.shift)
            target = clips[:, :, layout.target]
            noise = torch.randn(target.shape, generator=g)
            injection = draw_injection(g, size, self.rates)
            frame_shape = (clips.shape[1], *clips.shape[3:])
            errors = draw_errors(self.bank, injection, timesteps, len(layout.motion), len(layout.target), frame_shape, g)
            if not self.erft:
                errors = {part: torch.zeros_like(e) for part, e in errors.items()}
            inputs = teacher_inputs(clips, layout, timesteps, noise, errors)
            num_context = len(layout.context)
            with trainer.autocast():
                flow = self.model.forward_bidirectional(share(inputs.latents), share(inputs.timesteps), share(text * keep),
                                                        frame_positions=torch.tensor(layout.positions))
                predicted = flow[:, :, num_context:].float()
                loss = torch.mean((predicted - share(inputs.velocity)) ** 2)
            trainer.backward(loss, self.model, micro)
            total += loss.item() / trainer.accumulation
            self.recycle(predicted.detach(), share(inputs.latents[:, :, num_context:]), share(target), share(noise),
                         share(timesteps))
        grad_norm = trainer.optimizer_step("model", step)
        return {"loss": total, "grad_norm": grad_norm}

    def recycle(self, predicted, noisy, target, noise, timesteps):
        """Bank the residuals of this micro-batch's one-step predictions, for the whole global batch."""
        sigma = (timesteps / 1000.0).view(-1, 1, 1, 1, 1)
        x0_error = noisy - sigma * predicted - target
        noise_error = noisy + (1 - sigma) * predicted - noise
        timesteps = gather_batch(self.trainer, timesteps)
        self.bank.add("x0", timesteps, gather_batch(self.trainer, x0_error))
        self.bank.add("noise", timesteps, gather_batch(self.trainer, noise_error))

    def export(self, folder):
        from ...model import WanTransformer

        weights = self.trainer.weights("model", ema=True)  # every rank takes part in gathering, only rank 0 receives
        if not self.trainer.is_main:
            return
        if self.lora:
            weights = merge_lora(weights, lora_scale(self.lora))
        model = WanTransformer(self.model_cfg)
        model.load_state_dict(weights)
        save_transformer(model, f"{folder}/transformer.safetensors")
