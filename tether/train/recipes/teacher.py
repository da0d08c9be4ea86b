"""`teacher`: bidirectional flow matching, the real score for every distillation.

x_t = (1 - sigma) x0 + sigma * noise with sigma from the shifted schedule at a
uniformly drawn training timestep; the model predicts v = noise - x0 and the
loss is the mean squared error, optionally with classifier-free-guidance
dropout of the text (the teacher is sampled with CFG).

`text: {train: true, source: FOLDER}` trains the (toy) text encoder along
with the model, on the dataset's prompts instead of its stored embeddings;
the export then writes the trained encoder to `text_encoder/`. That is the
toy-world issue's "frozen-random or trained text encoder" question, asked of
the teacher, where prompt following is learnt.

`loss.word_contrast: {weight, margin, min_timestep, attributes, leak}` adds
tether.train.word_contrast's loss (toy datasets: it swaps words of the
world's prompt grammar); a frozen text encoder for the variant prompts comes
from `text.source`.
"""

import torch

from ...checkpoints import load_transformer, save_transformer
from ...errors import TetherError
from ...text import TIED_EMBEDDING_KEY, load_text_encoder, save_toy_text_encoder
from ...schedule import timestep_grid
from ..data import make_data
from ..recipe import Recipe, register_recipe
from ..word_contrast import SUBJECT_ATTRIBUTES, swapped_prompt, word_contrast_loss


def sample_timesteps(generator, size: int, shift: float, low: float = 0.0, high: float = 1000.0) -> torch.Tensor:
    """Training timesteps drawn uniformly from the shifted 1000-step grid, clamped to [low, high]."""
    grid = timestep_grid(shift)[:-1].float()
    return grid[torch.randint(len(grid), (size,), generator=generator)].clamp(low, high)


def squared_flow_error(model, latents, text, timesteps, noise, forward="bidirectional", chunk_size=3):
    """Squared error of the predicted flow at every latent value [B, C, F, h, w]."""
    sigma = (timesteps / 1000.0).view(-1, *([1] * (latents.dim() - 1)))
    noisy = (1 - sigma) * latents + sigma * noise
    if forward == "bidirectional":
        flow = model.forward_bidirectional(noisy, timesteps, text)
    else:
        flow = model.forward_block_causal(noisy, timesteps, text, chunk_size=chunk_size)
    return (flow.float() - (noise - latents).float()) ** 2


def weighted_mean(squared, weight=None):
    """The mean of `squared`, or its `weight`-weighted mean (`weight` broadcasts to it)."""
    if weight is None:
        return squared.mean()
    return (squared * weight).sum() / (weight.expand_as(squared).sum())


def flow_matching_loss(model, latents, text, timesteps, noise, forward="bidirectional", chunk_size=3, weight=None):
    """Mean squared error of the predicted flow; `weight` [B, 1, F, h, w] makes it a weighted mean."""
    return weighted_mean(squared_flow_error(model, latents, text, timesteps, noise, forward, chunk_size), weight)


@register_recipe
class Teacher(Recipe):
    name = "teacher"

    def prepare_model(self, model):
        """Hook for variants that adapt the network before training (e.g. LoRA)."""
        return model

    def setup(self):
        cfg = self.cfg
        model = load_transformer(cfg["model"]["source"], config=cfg["model"].get("config"))
        self.model_cfg = model.config
        model = self.prepare_model(model)
        self.model = self.trainer.add_model("model", model.float().train(), ema=cfg.get("ema"), ema_start=cfg.get("ema_start", 0))
        opt = cfg.get("optimizer", {})
        self.trainer.add_optimizer_from_config("model", self.model, opt, default_lr=1e-4)
        self.data = make_data(cfg.get("data", {}), self.model_cfg)
        self.batch_size = int(cfg.get("batch_size", 1))
        self.shift = float(cfg.get("shift", 5.0))
        self.text_dropout = float(cfg.get("text_dropout", 0.1))
        # Toy datasets only: latent pixels on an object weigh 1 + object_weight in the loss. A subject
        # covers a few % of a frame, so without it the prompt's colour, shape and pattern words are a
        # few % of the loss and the background's word is the rest.
        self.object_weight = float(cfg.get("loss", {}).get("object_weight", 0.0))
        if self.object_weight and getattr(self.data, "masks", None) is None:
            raise TetherError("loss.object_weight needs a toy dataset with object masks (data.kind=latents, masks.pt: "
                              "tether.train.toy_data.write_object_masks(FOLDER) writes them)")
        self.text_encoder = None
        self.frozen_text = False  # a text encoder loaded only to embed word_contrast's variant prompts
        text_cfg = cfg.get("text", {})
        if text_cfg.get("train"):
            if "source" not in text_cfg:
                raise TetherError("text.train needs text.source, the text encoder to start from")
            self.text_encoder = load_text_encoder(text_cfg["source"], dtype=torch.float32)
            self.text_encoder.model.requires_grad_(True)
            self.trainer.add_model("text", self.text_encoder.model, ema=cfg.get("ema"), ema_start=cfg.get("ema_start", 0))
            self.trainer.add_optimizer_from_config("text", self.text_encoder.model, {**opt, **text_cfg.get("optimizer", {})},
                                                   default_lr=1e-4)
        self.contrast = cfg.get("loss", {}).get("word_contrast")
        if self.contrast:
            self._setup_word_contrast(text_cfg)

    def _setup_word_contrast(self, text_cfg):
        """`loss.word_contrast: {weight, margin, min_timestep, attributes, leak}`: see tether.train.word_contrast."""
        known = {"weight", "margin", "min_timestep", "attributes", "leak"}
        if not isinstance(self.contrast, dict) or set(self.contrast) - known:
            raise TetherError(f"loss.word_contrast is a mapping of {', '.join(sorted(known))}")
        if getattr(self.data, "masks", None) is None or getattr(self.data, "prompts", None) is None:
            raise TetherError("loss.word_contrast needs a toy dataset with prompts.json and masks.pt (data.kind=latents)")
        if self.text_encoder is None:
            if "source" not in text_cfg:
                raise TetherError("loss.word_contrast needs text.source, the text encoder that embedded the dataset's prompts")
            self.text_encoder = load_text_encoder(text_cfg["source"], dtype=torch.float32)
            self.text_encoder.model.requires_grad_(False)
            self.frozen_text = True
        attributes = self.contrast.get("attributes", list(SUBJECT_ATTRIBUTES))
        unknown = set(attributes) - set(SUBJECT_ATTRIBUTES)
        if unknown:
            raise TetherError(f"loss.word_contrast.attributes: unknown {sorted(unknown)} (known: {', '.join(SUBJECT_ATTRIBUTES)})")
        self.contrast_attributes = tuple(attributes)
        self.contrast_weight = float(self.contrast.get("weight", 1.0))
        self.contrast_margin = float(self.contrast.get("margin", 0.1))
        self.contrast_min_timestep = float(self.contrast.get("min_timestep", 500))
        self.contrast_leak = float(self.contrast.get("leak", 0.0))
        if not 0.0 <= self.contrast_leak <= 1.0:
            raise TetherError(f"loss.word_contrast.leak is a probability in [0, 1], got {self.contrast_leak}")
        self.text_checked = False

    def _embed(self, prompts):
        with torch.set_grad_enabled(not self.frozen_text):
            return self.text_encoder.embed(prompts)

    def _check_text_space(self, prompts, stored):
        """The dataset was embedded by text.source's encoder, or the contrast would compare two text spaces."""
        gap = (self._embed(prompts).float() - stored).abs().max().item()
        if gap > 1e-2 * max(1.0, stored.abs().max().item()):  # datasets may store fp16; another encoder differs by O(1)
            raise TetherError(f"text.source does not reproduce the dataset's stored prompt embeddings (max difference {gap:.3g}): "
                              "point it at the text encoder the dataset was built with")
        self.text_checked = True

    def step(self, step: int) -> dict:
        total = contrast_total = 0.0
        trainer = self.trainer
        size = self.batch_size * trainer.world_size
        for micro in range(trainer.accumulation):
            g = trainer.shared_generator(step, "batch", micro)
            options = {"with_masks": True} if self.object_weight or self.contrast else {}
            if self.text_encoder is None:
                latents, text, *masks = self.data.batch(g, size, **options)
            else:
                latents, stored_text, prompts, *masks = self.data.batch(g, size, with_prompts=True, **options)
                if self.contrast and self.frozen_text:
                    if not self.text_checked:
                        self._check_text_space(prompts, stored_text)
                    text = stored_text
                else:
                    text = self.text_encoder.embed(prompts)
            weight = 1 + self.object_weight * masks[0] if self.object_weight else None
            keep = (torch.rand(size, generator=g) >= self.text_dropout).float().view(-1, 1, 1)
            timesteps = sample_timesteps(g, size, self.shift)
            noise = torch.randn(latents.shape, generator=g)
            share = trainer.my_share
            with trainer.autocast():
                if self.contrast:
                    mine = slice(trainer.rank * self.batch_size, (trainer.rank + 1) * self.batch_size)
                    variants = [swapped_prompt(p, self.contrast_attributes, g, self.contrast_leak) if kept and t >= self.contrast_min_timestep
                                else None for p, kept, t in zip(prompts, keep.flatten().tolist(), timesteps.tolist())]
                    loss, contrast = self._loss_with_contrast(share(latents), share(text * keep), share(timesteps),
                                                              share(noise), None if weight is None else share(weight),
                                                              share(masks[0]), variants[mine])
                    contrast_total += contrast.item() / trainer.accumulation
                    loss_to_train = loss + self.contrast_weight * contrast
                else:
                    loss = flow_matching_loss(self.model, share(latents), share(text * keep), share(timesteps), share(noise),
                                              weight=None if weight is None else share(weight))
                    loss_to_train = loss
            trainer.backward(loss_to_train, self.model, micro)
            total += loss.item() / trainer.accumulation
        grad_norm = trainer.optimizer_step("model", step)
        metrics = {"loss": total, "grad_norm": grad_norm}
        if self.contrast:
            metrics["word_contrast"] = contrast_total
        if self.text_encoder is not None and not self.frozen_text:
            metrics["text_grad_norm"] = trainer.optimizer_step("text", step)
        return metrics

    def _loss_with_contrast(self, latents, text, timesteps, noise, weight, masks, variants):
        """(flow-matching loss, word-contrast loss): the clips with a variant prompt run a second time under it,
        in the same forward pass."""
        pairs = [i for i, v in enumerate(variants) if v is not None]
        if not pairs:
            squared = squared_flow_error(self.model, latents, text, timesteps, noise)
            return weighted_mean(squared, weight), squared.sum() * 0
        index = torch.tensor(pairs, device=latents.device)
        variant_text = self._embed([variants[i] for i in pairs]).to(text)
        squared = squared_flow_error(self.model, torch.cat([latents, latents[index]]), torch.cat([text, variant_text]),
                                     torch.cat([timesteps, timesteps[index]]), torch.cat([noise, noise[index]]))
        own, swapped = squared[:len(latents)], squared[len(latents):]
        return weighted_mean(own, weight), word_contrast_loss(own[index], swapped, masks[index], self.contrast_margin)

    def export(self, folder):
        from ...model import WanTransformer

        model = WanTransformer(self.model_cfg)
        model.load_state_dict(self.trainer.weights("model", ema=bool(self.cfg.get("ema"))))
        save_transformer(model, f"{folder}/transformer.safetensors")
        if self.text_encoder is not None and not self.frozen_text:
            weights = self.trainer.weights("text", ema=bool(self.cfg.get("ema")))
            # The EMA keeps each parameter once, under its first name: the token embedding's tied alias
            # would load the live value over the EMA's.
            weights.pop(TIED_EMBEDDING_KEY, None)
            missing, unexpected = self.text_encoder.model.load_state_dict(weights, strict=False)
            if set(missing) - {TIED_EMBEDDING_KEY} or unexpected:
                raise TetherError(f"text encoder weights do not fit: missing {missing}, unexpected {unexpected}")
            save_toy_text_encoder(self.text_encoder, f"{folder}/text_encoder")
