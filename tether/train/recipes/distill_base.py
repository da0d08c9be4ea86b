"""What the distillation recipes share: the generator, optimisers from config, rank-consistent draws, export.

Every random draw goes through `GlobalDraws`: it draws the tensor for the
whole global batch from the shared generator and keeps this rank's rows, so
N ranks with batch b compute what one rank with batch N*b does, and a resumed
run draws what an uninterrupted one would have.
"""

import torch

from ...checkpoints import load_transformer, save_transformer
from ..data import SyntheticData
from ..lora import add_lora, load_adapter_into, lora_scale, merge_lora, save_adapter
from ..recipe import Recipe


def draw_prompts(data, generator, size: int) -> torch.Tensor:
    """Text embeddings [size, L, text_dim] only: distillation needs prompts, not clips.

    Synthetic latents for a global batch at Wan scale would be gigabytes per
    draw on every rank, so for synthetic data only the text is drawn.
    """
    if isinstance(data, SyntheticData):
        return torch.randn((size, *data.text_shape), generator=generator)
    return data.text[torch.randint(len(data.text), (size,), generator=generator)].float()


def clip_shape(data) -> tuple:
    """(channels, frames, height, width) of the clips a data source describes."""
    if isinstance(data, SyntheticData):
        return tuple(data.shape)
    channels, _, height, width = data.latents.shape[1:]
    return channels, data.frames, height, width



class GlobalDraws:
    """Gaussian and integer draws for one (step, purpose, micro-batch), identical on every rank."""

    def __init__(self, trainer, step: int, *purpose):
        self.trainer = trainer
        self.step, self.purpose = step, purpose
        self.generator = trainer.shared_generator(step, *purpose)

    def noise(self, shape, dtype=torch.float32):
        """This rank's share of a [world * B, ...] Gaussian draw; `shape` is per rank."""
        world = self.trainer.world_size
        full = torch.randn((shape[0] * world, *shape[1:]), generator=self.generator)
        return self.trainer.my_share(full).to(dtype)

    def share(self, tensor):
        return self.trainer.my_share(tensor)

    def sample_noise(self, batch: int) -> "SampleNoise":
        """Gaussian streams for this rank's `batch` samples, one per global sample index."""
        trainer = self.trainer
        first = trainer.rank * batch
        return SampleNoise([trainer.shared_generator(self.step, *self.purpose, "sample", first + i)
                            for i in range(batch)], trainer.device)


class SampleNoise:
    """Gaussian draws with one stream per sample: what a sample draws does not depend on its batch.

    A rollout's noise has to be the same whether a sample is generated on
    one rank in a batch of 8, on one of 8 ranks alone, or on its own (when
    each sample keeps its own memory: `SelfForcing.per_sample_memory`).
    """

    def __init__(self, generators: list, device="cpu"):
        self.generators = generators
        self.device = device

    def __call__(self, shape):
        return torch.stack([torch.randn(tuple(shape[1:]), generator=g) for g in self.generators]).to(self.device)

    def split(self) -> list:
        return [SampleNoise([g], self.device) for g in self.generators]


class DistillationRecipe(Recipe):
    """Base of ode-init and the DMD recipes: a causal generator trained from `model.source`."""

    def setup_generator(self):
        cfg = self.cfg
        model = load_transformer(cfg["model"]["source"], config=cfg["model"].get("config"))
        self.model_cfg = model.config
        # `lora:` trains adapters on a frozen generator (LongLive's way); the export saves them on their own too.
        self.lora = cfg.get("lora")
        if self.lora:
            model = add_lora(model, self.lora)
            if self.lora.get("init"):  # a later stage continues an earlier stage's adapter
                load_adapter_into(model, self.lora["init"])
        self.generator = self.trainer.add_model("generator", model.float().train(), ema=cfg.get("ema"),
                                                ema_start=int(cfg.get("ema_start", 0)))
        self.trainer.add_optimizer_from_config("generator", self.generator, cfg.get("optimizer", {}), 2e-6)
        self.batch_size = int(cfg.get("batch_size", 1))
        self.shift = float(cfg.get("shift", 5.0))
        self.chunk_frames = int(cfg.get("chunk_frames", 3))
        self.denoising_steps = list(cfg.get("denoising_steps", [1000, 750, 500, 250]))

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.trainer.world_size

    def export(self, folder):
        """The generator (its EMA when one is kept) as `folder/transformer.safetensors`.

        A LoRA run writes the merged weights there and its adapter alone to `folder/adapter`.
        """
        from ...model import WanTransformer

        weights = self.trainer.weights("generator", ema=True)  # every rank takes part in gathering, only rank 0 receives
        if not self.trainer.is_main:
            return
        if self.lora:
            save_adapter(weights, self.lora, f"{folder}/adapter")
            weights = merge_lora(weights, lora_scale(self.lora))
        model = WanTransformer(self.model_cfg)
        model.load_state_dict(weights)
        save_transformer(model, f"{folder}/transformer.safetensors")
