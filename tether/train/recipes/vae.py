"""`vae`: train the toy world's video VAE (Wan2.1's architecture, narrow channels).

Wan's own VAE is pretrained and never trained here; only the toy one (a random
`AutoencoderKLWan` with base_dim 16) needs this, because random weights give
latents that carry almost nothing of the frame.

Batches are short world clips (1 + 4k frames, k = `data.frames` - 1) cut at a
random point of an 81-frame clip, so objects are seen mid-motion, entering,
leaving and under camera pans. `data.frames/height/width` count *latent*
frames and latent pixels (pixels / the VAE's spatial stride, 8 or 4), as every
other recipe's data section does; `data.crop` (latent pixels) trains on random square crops.

Loss, on pixels in [-1, 1]:
- L1 + MSE: L1 keeps flat colour regions exact, MSE punishes the rare large
  errors on outlines that L1 tolerates;
- an edge loss (L1 between the recon's and the clip's spatial differences),
  because stripes and dots are 1-3 px features that a blurry recon loses while
  barely moving the pixel loss;
- KL to N(0, 1) with LDM's/Wan's weight 1e-6 *per pixel value* (the KL is
  summed over latent values and divided by pixel values, as LDM sums both).
  It is only there to keep the means' scale from drifting: the diffusion
  model sees posterior means renormalised per channel (see `export`), so a
  larger weight would cost reconstruction and buy nothing;
- optionally (`loss.adversarial: w`, off by default) a patch discriminator's
  hinge loss, at w times VQGAN's adaptive weight: see
  `tether/train/patch_discriminator.py`. `discriminator.start` delays the
  VAE's side of it; `discriminator.channels` and `discriminator.optimizer`
  shape the discriminator, which is checkpointed with the VAE but not exported.

The decoder is trained on the posterior mean (`sample_posterior: false`):
that is all the diffusion model will ever produce or see, and sampling from
a random init's wide posterior slows the start badly (measured: held-out
PSNR still 13.5 dB after 100 steps with sampling on).

There is no Wan-scale config: Wan2.1's VAE is pretrained and used as is.

What it took to make this architecture train from scratch (measured on 2 CPU
cores; see the config's comments):
- `kaiming_init`: with PyTorch's default init the latent barely depends on
  the input and training sits at the dataset's mean frame for 1,000+ steps;
- 21-frame clips: trained on 9-frame clips, the decoder broke down from the
  4th latent frame on, the causal caches' steady state being unseen;
- object-centred crops (`data.object_crops`): objects cover a few % of a
  frame, and a loss that is nearly all background learns them last.
Even so, a CPU hour gives a blurry VAE (~20-22 dB); more steps (a GPU) continue
from the shipped weights with `model.source=tether/weights/default/vae`.

`data.warmup: K` trains the causal caches' steady state. Every convolution
of this VAE looks 2 latent frames back through its cache, so across its
layers the caches take far longer to settle than a 21-frame clip: trained on
such clips, a VAE decodes 21-frame clips well and the frames of a long video
after ~frame 30 with a colour cast (measured: 24.2 dB on frames 16-20,
19.4-20.4 dB from frame 50 on, red +13, with the 6,800-step VAE). With
warm-up, each step first runs 0..K encoder chunks through both caches without
gradients (a truncated backpropagation through time), then trains the frames
after them. Export reports `psnr_db_late_frames` (frames 81-160 of 161-frame
clips) beside the usual `psnr_db` (frames 0-32).

`export.frame_scale: true` also measures the normalised latents' std at each
latent frame index and saves it in the config (`latents_frame_scale`), so the
codec brings every frame index to unit scale: trained from scratch, the causal
encoder writes the first latent frames at a third of the steady scale
(`tether bench latents`), where every diffusion timestep leaves them at ~1/9
of the later frames' signal-to-noise ratio. It changes the latent space, so it
is off for the shipped VAE and for decoder-only fine-tunes (which keep theirs).
"""

import json
import math
from pathlib import Path

import torch

from ...errors import TetherError
from ...vae import FRAME_SCALE_KEY, LatentCodec, builtin_vae, load_vae, std_by_latent_frame, use_onednn_convolutions
from ..recipe import Recipe, register_recipe
from ..patch_discriminator import PatchDiscriminator, adaptive_weight, discriminator_loss, generator_loss
from ..toy_data import clips_to_video, sample_clip

CLIP_FRAMES = 81  # batches are cut from clips this long (5 s at 16 fps), as the dataset's clips are
ENCODER_CHUNK = 4  # AutoencoderKLWan._encode feeds its causal encoder the first frame, then 4 frames at a time
LATE_FRAMES = (81, 161)  # export's second PSNR: frames 81-160, where the causal caches are in their steady state
HELD_OUT_SEED = 1  # training draws from stream data.seed (0); evaluation and statistics from this one


def _temporal_stride(vae) -> int:
    return vae.config.scale_factor_temporal or 4


def _spatial_stride(vae) -> int:
    return vae.config.scale_factor_spatial or 8


def psnr(reference_uint8: torch.Tensor, decoded_uint8: torch.Tensor) -> float:
    mse = (reference_uint8.float() - decoded_uint8.float()).pow(2).mean().item()
    return float("inf") if mse == 0 else 10 * math.log10(255.0**2 / mse)


@torch.no_grad()
def evaluate_vae(codec: LatentCodec, n_clips: int = 16, seed: int = HELD_OUT_SEED, num_frames: int = 33,
                 size: int = 64, skip: int = 0) -> float:
    """PSNR (dB) of encode -> decode on held-out world clips, measured on the uint8 frames one would watch.

    `skip`: score only the frames from this one on (the clip is still encoded and decoded whole), e.g.
    the frames where the causal caches have reached their steady state.
    """
    squared, count = 0.0, 0
    for index in range(n_clips):
        frames, _ = sample_clip(seed, index, num_frames, size)
        video = clips_to_video([frames]).to(device=codec.device, dtype=codec.dtype)
        decoded = codec.decode(codec.encode(video)).float().clamp(-1, 1)[:, :, skip:]
        decoded_uint8 = (decoded + 1).mul(127.5).round()
        reference = torch.from_numpy(frames[skip:]).permute(3, 0, 1, 2).unsqueeze(0).float()
        squared += (decoded_uint8.cpu() - reference).pow(2).sum().item()
        count += reference.numel()
    return 10 * math.log10(255.0**2 / (squared / count))


@torch.no_grad()
def decoder_gain_by_frame(codec: LatentCodec, n_clips: int = 4, num_frames: int = 33, size: int = 64,
                          noise: float = 0.2, seed: int = HELD_OUT_SEED) -> list:
    """Per latent frame index k: the RMS pixel change (of 255) its decoded frames show when
    N(0, noise^2) is added to latent frame k alone (normalised latents, held-out clips).

    This is the factor by which the decoder amplifies a diffusion model's error at each
    frame. A causal decoder decodes frame 0 on its own, from empty caches, and can be far more
    sensitive there than in its steady state.
    """
    generator = torch.Generator().manual_seed(0)
    stride = codec.temporal_stride
    squared = None
    for index in range(n_clips):
        frames, _ = sample_clip(seed, 20_000 + index, num_frames, size)  # clips no other evaluation uses
        latents = codec.encode(clips_to_video([frames]).to(device=codec.device, dtype=codec.dtype))
        clean = codec.decode(latents).float()
        if squared is None:
            squared = [0.0] * latents.shape[2]
        for k in range(latents.shape[2]):
            nudged = latents[:, :, :k + 1].clone()  # the decoder is causal: later frames cannot change these
            nudged[:, :, k] += noise * torch.randn(nudged[:, :, k].shape, generator=generator).to(nudged)
            pixels = slice(0, 1) if k == 0 else slice(1 + stride * (k - 1), 1 + stride * k)
            squared[k] += (codec.decode(nudged).float()[:, :, pixels] - clean[:, :, pixels]).pow(2).mean().item()
    return [round(127.5 * math.sqrt(total / n_clips), 2) for total in squared]


@torch.no_grad()
def latent_statistics(vae, n_clips: int, num_frames: int, size: int, seed: int = HELD_OUT_SEED):
    """Per-channel mean and std of the posterior means of held-out clips (raw, unnormalised latents), and
    the std at each latent frame index of the latents normalised by those (the codec's
    `latents_frame_scale`, which brings every frame index to unit scale)."""
    raw = []
    for index in range(n_clips):
        frames, _ = sample_clip(seed, 10_000 + index, num_frames, size)  # clips the PSNR evaluation does not use
        raw.append(vae.encode(clips_to_video([frames])).latent_dist.mean)
    raw = torch.cat(raw)  # [clips, channels, frames, h, w]
    channels = raw.transpose(0, 1).flatten(1)
    mean, std = channels.mean(1), channels.std(1).clamp_min(1e-6)
    normalised = (raw - mean.view(1, -1, 1, 1, 1)) / std.view(1, -1, 1, 1, 1)
    return mean.tolist(), std.tolist(), std_by_latent_frame(normalised)


def warm_up_frames(chunks: int) -> int:
    """How many video frames `chunks` encoder chunks hold: the first frame alone, then ENCODER_CHUNK at a time."""
    return 0 if chunks == 0 else 1 + ENCODER_CHUNK * (chunks - 1)


def encode_posterior(vae, video: torch.Tensor, warm: int = 0) -> tuple:
    """diffusers' AutoencoderKLWan._encode, chunk by chunk, with the first `warm` chunks run without gradients.

    Returns the posterior means of the warm-up chunks (None if warm is 0) and the
    posterior of the rest. The warm-up only fills the causal caches: training the
    frames after it teaches the encoder (and, via `decode_without_clamp`'s warm-up,
    the decoder) the caches' steady state, which a clip of a few latent frames
    never reaches and every long video lives in.
    """
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    if vae.config.patch_size is not None:
        raise TetherError("encode_posterior follows Wan2.1's VAE, which has no patch_size (Wan2.2's has)")
    vae.clear_cache()
    outputs = []
    for i in range(1 + (video.shape[2] - 1) // ENCODER_CHUNK):
        vae._enc_conv_idx = [0]
        chunk = video[:, :, :1] if i == 0 else video[:, :, 1 + ENCODER_CHUNK * (i - 1):1 + ENCODER_CHUNK * i]
        with torch.set_grad_enabled(torch.is_grad_enabled() and i >= warm):
            outputs.append(vae.encoder(chunk, feat_cache=vae._enc_feat_map, feat_idx=vae._enc_conv_idx))
    vae.clear_cache()
    warm_means = None
    if warm:
        with torch.no_grad():  # quant_conv is 1x1x1: each part can go through it on its own
            warm_means = DiagonalGaussianDistribution(vae.quant_conv(torch.cat(outputs[:warm], 2))).mean
    return warm_means, DiagonalGaussianDistribution(vae.quant_conv(torch.cat(outputs[warm:], 2)))


def decode_without_clamp(vae, latents: torch.Tensor, warm: int = 0) -> torch.Tensor:
    """diffusers' AutoencoderKLWan._decode without its final clamp to [-1, 1]; the first `warm` latent
    frames only fill the causal caches (no gradients, not returned).

    The clamp has no gradient outside [-1, 1]: a decoder that overshoots on
    one bad step (measured: step 94 of a from-scratch run at lr 1e-3) keeps
    saturated pixels it can never pull back, and training stalls for good.
    """
    vae.clear_cache()
    x = vae.post_quant_conv(latents)
    frames = []
    for i in range(latents.shape[2]):  # frame by frame, carrying the causal cache, as diffusers decodes
        vae._conv_idx = [0]
        with torch.set_grad_enabled(torch.is_grad_enabled() and i >= warm):
            out = vae.decoder(x[:, :, i:i + 1], feat_cache=vae._feat_map, feat_idx=vae._conv_idx, first_chunk=i == 0)
        if i >= warm:
            frames.append(out)
    vae.clear_cache()
    return torch.cat(frames, 2)


def kaiming_init(vae, seed: int = 0) -> None:
    """Re-initialise every convolution: He-normal weights (ReLU gain), zero biases.

    PyTorch's default conv init (uniform, gain 1/sqrt(3)) plus its random
    biases makes this architecture nearly blind to its input at the start:
    every RMS norm divides out the shrinking signal and keeps the constant the
    biases add. Measured on 6 world clips: the posterior means of different
    clips have cosine 0.87 (between-clip std of channel means 0.017), and
    training on random clips then stays at the dataset's mean frame (13-15 dB
    for 1,200+ steps). With this init the cosine is 0.14 (std 0.27) and the
    decoder has a latent worth reading from the first step.
    """
    generator = torch.Generator().manual_seed(seed)
    for module in vae.modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Conv3d)):
            fan_in = module.weight[0].numel()
            with torch.no_grad():
                module.weight.normal_(0.0, math.sqrt(2.0 / fan_in), generator=generator)
                if module.bias is not None:
                    module.bias.zero_()


@register_recipe
class VAE(Recipe):
    name = "vae"

    def setup(self):
        cfg = self.cfg
        source = str(cfg.get("model", {}).get("source", "toy"))
        # `model.config`: AutoencoderKLWan arguments over a built-in config (z_dim, temperal_downsample, ...),
        # to train a variant from scratch. A trained folder carries its own architecture.
        variant = cfg.get("model", {}).get("config")
        if variant and Path(source).exists():
            raise TetherError("model.config changes a built-in VAE's architecture: model.source must name one, not a folder")
        if variant:
            if not isinstance(variant, dict):
                raise TetherError(f"model.config must be a mapping of AutoencoderKLWan arguments, got {variant!r}")
            vae = builtin_vae(source, variant)
        else:
            vae = load_vae(source, fast_cpu_convolutions=False)  # a folder fine-tunes a trained VAE
        if cfg.get("model", {}).get("init") == "kaiming" and not Path(source).exists():
            kaiming_init(vae, seed=int(cfg.get("seed", 0)))
        vae = vae.float().train().requires_grad_(True)
        # `decoder`: fine-tune how latents are drawn and keep what they mean. The encoder (and so
        # the latent space every transformer was trained on) stays as it is, so a sharper decoder
        # improves the shipped models' videos without retraining any of them.
        self.train_part = str(cfg.get("model", {}).get("train", "all"))
        if self.train_part not in ("all", "decoder"):
            raise TetherError(f"model.train must be 'all' or 'decoder', got '{self.train_part}'")
        if self.train_part == "decoder":
            if not Path(source).exists():
                raise TetherError("model.train=decoder fine-tunes a trained VAE: model.source must be its folder")
            vae.encoder.requires_grad_(False)
            vae.quant_conv.requires_grad_(False)
        self.vae = self.trainer.add_model("vae", vae, ema=cfg.get("ema"), ema_start=cfg.get("ema_start", 0))
        self.trainer.add_optimizer_from_config("vae", self.vae, cfg.get("optimizer", {}), default_lr=5e-4)
        data = cfg.get("data", {})
        stride = _temporal_stride(vae)
        self.latent_frames = int(data.get("frames", 3))
        self.num_frames = 1 + stride * (self.latent_frames - 1)
        # `data.warmup: K`: each step first runs 0..K encoder chunks (4 frames; latent frames at stride 4) through
        # the causal caches without gradients, so that the trained frames come after the caches' cold start
        # (see encode_posterior). Off by default: one stream of random draws for runs that do not use it.
        self.warmup = int(data.get("warmup", 0))
        self.spatial_stride = _spatial_stride(vae)
        self.size = self.spatial_stride * int(data.get("height", 8))
        self.data_seed = int(data.get("seed", 0))
        # Training on random crops of the rendered frames: the VAE is convolutional, so a crop teaches
        # the same local code at a quarter of the cost, i.e. 4x more updates in the same CPU time.
        self.crop = min(self.size, self.spatial_stride * int(data["crop"])) if data.get("crop") else self.size
        # Objects cover a few % of a frame, so random crops rarely hold one and the loss is all
        # background: this share of crops is centred on an object instead.
        self.object_crops = float(data.get("object_crops", 0.0))
        self.batch_size = int(cfg.get("batch_size", 2))
        weights = cfg.get("loss", {})
        self.weights = {name: float(weights.get(name, default))
                        for name, default in (("l1", 1.0), ("mse", 1.0), ("edge", 0.5), ("kl", 1e-6))}
        # `loss.adversarial`: a patch discriminator's term (tether/train/patch_discriminator.py), off by default.
        self.adversarial = float(weights.get("adversarial", 0.0))
        if self.adversarial:
            settings = cfg.get("discriminator", {})
            self.discriminator = self.trainer.add_model(
                "discriminator", PatchDiscriminator(int(settings.get("channels", 32)), seed=int(cfg.get("seed", 0))).train())
            self.trainer.add_optimizer_from_config("discriminator", self.discriminator,
                                                   settings.get("optimizer", {"betas": [0.5, 0.9]}), default_lr=2e-4)
            # the generator feels the discriminator only from this step on, once it tells real from fake at all
            self.adversarial_start = int(settings.get("start", 0))
        # The diffusion model only ever sees posterior means, and a random init's posterior std (~1)
        # drowns the means (~0.1): sampling makes the first hundreds of steps learn nothing but the
        # mean frame. Off by default; the KL still bounds the means' scale.
        self.sample_posterior = bool(cfg.get("sample_posterior", False))
        self.eval_every = int(cfg.get("eval_every", 0))
        self.eval_clips = int(cfg.get("eval_clips", 4))

    def batch(self, generator: torch.Generator, size: int, warm: int = 0) -> torch.Tensor:
        """A batch of world clips [size, 3, T, H, W], each cut at a random frame of its 81-frame clip
        (longer if the warm-up needs it): `warm` warm-up chunks, then the trained frames."""
        lead = warm_up_frames(warm)
        # after a warm-up the trained latent frames are whole chunks, not a first frame and chunks
        total = lead + (self.num_frames if warm == 0 else _temporal_stride(self.vae) * self.latent_frames)
        clips = []
        for _ in range(size):
            index = int(torch.randint(2**31 - 1, (1,), generator=generator))
            start = int(torch.randint(max(CLIP_FRAMES, total) - total + 1, (1,), generator=generator))
            top, left = (int(torch.randint(self.size - self.crop + 1, (1,), generator=generator)) for _ in range(2))
            frames, _, truths = sample_clip(self.data_seed, index, start + total, self.size, with_truth=True)
            if float(torch.rand((), generator=generator)) < self.object_crops:
                top, left = self._around_object(truths[start + lead], top, left)
            clips.append(frames[start:, top:top + self.crop, left:left + self.crop])
        return clips_to_video(clips)

    def _around_object(self, truth, top: int, left: int) -> tuple:
        """A crop window holding the first visible object of the cut's first frame, if there is one."""
        visible = [o for o in truth.objects if o.visible]
        if not visible or self.crop >= self.size:
            return top, left
        obj = visible[0]
        place = lambda centre: int(min(max(round(centre) - self.crop // 2, 0), self.size - self.crop))
        return place(obj.y), place(obj.x)

    def latent_shape(self, video: torch.Tensor, warm: int = 0) -> tuple:
        """The trained latents' shape: those after the `warm` warm-up chunks."""
        config = self.vae.config
        batch, _, frames, height, width = video.shape
        stride = _temporal_stride(self.vae)
        count = 1 + (frames - 1) // stride - (1 + (warm_up_frames(warm) - 1) // stride if warm else 0)
        return (batch, config.z_dim, count, height // self.spatial_stride, width // self.spatial_stride)

    def losses(self, video: torch.Tensor, noise: torch.Tensor, step: int = 0, warm: int = 0) -> tuple:
        """The generator's loss terms (and their weighted sum, "loss"), and the reconstruction.

        With `warm` warm-up chunks, both are of the frames after them: `video` is cut to those."""
        with torch.set_grad_enabled(self.train_part == "all"):
            warm_means, posterior = encode_posterior(self.vae, video, warm)
        latents = posterior.mean + posterior.std * noise if self.sample_posterior else posterior.mean
        context = latents if warm_means is None else torch.cat([warm_means, latents], 2)
        recon = decode_without_clamp(self.vae, context, warm=context.shape[2] - latents.shape[2])
        video = video[:, :, warm_up_frames(warm):]
        terms = {
            "l1": (recon - video).abs().mean(),
            "mse": (recon - video).pow(2).mean(),
            "edge": sum((recon.diff(dim=d) - video.diff(dim=d)).abs().mean() for d in (-1, -2)) / 2,
            "kl": 0.5 * (posterior.mean.pow(2) + posterior.var - 1 - posterior.logvar).sum() / video.numel(),
        }
        terms["loss"] = sum(self.weights[name] * value for name, value in terms.items())
        if self.adversarial and step >= self.adversarial_start:
            self.discriminator.requires_grad_(False)  # this term trains the VAE only
            terms["adversarial"] = generator_loss(self.discriminator(recon))
            self.discriminator.requires_grad_(True)
            terms["adversarial_weight"] = adaptive_weight(terms["loss"], terms["adversarial"],
                                                          self.vae.decoder.conv_out.weight) * self.adversarial
            terms["loss"] = terms["loss"] + terms["adversarial_weight"] * terms["adversarial"]
        return terms, recon

    def discriminator_terms(self, video: torch.Tensor, recon: torch.Tensor) -> dict:
        real, fake = self.discriminator(video), self.discriminator(recon.detach())
        return {"discriminator": discriminator_loss(real, fake),
                # how often it is right, per patch: near 0.5 it has nothing left to tell the generator
                "discriminator_accuracy": ((real > 0).float().mean() + (fake < 0).float().mean()) / 2}

    def step(self, step: int) -> dict:
        trainer = self.trainer
        size = self.batch_size * trainer.world_size
        logged = {}
        for micro in range(trainer.accumulation):
            g = trainer.shared_generator(step, "batch", micro)
            warm = int(torch.randint(self.warmup + 1, (1,), generator=g)) if self.warmup else 0
            video = self.batch(g, size, warm)
            noise = torch.randn(self.latent_shape(video, warm), generator=g)  # the posterior sample's noise, global like the batch
            video, noise = trainer.my_share(video), trainer.my_share(noise)
            with trainer.autocast():
                terms, recon = self.losses(video, noise, step, warm)
            trainer.backward(terms["loss"], self.vae, micro)
            if self.adversarial:
                with trainer.autocast():
                    terms.update(self.discriminator_terms(video[:, :, warm_up_frames(warm):], recon))
                trainer.backward(terms["discriminator"], self.discriminator, micro)
            for name, value in terms.items():
                logged[name] = logged.get(name, 0.0) + value.item() / trainer.accumulation
        logged["grad_norm"] = trainer.optimizer_step("vae", step)
        if self.adversarial:
            logged["discriminator_grad_norm"] = trainer.optimizer_step("discriminator", step)
        if self.eval_every and (step + 1) % self.eval_every == 0:
            # The live weights (not the EMA): cheap enough to watch progress in log.jsonl.
            logged["psnr"] = evaluate_vae(LatentCodec(self.vae), self.eval_clips, num_frames=17, size=self.size)
        return logged

    def export(self, folder):
        """A diffusers VAE folder whose config carries the latents' per-channel mean and std.

        The diffusion transformer is trained on normalised latents; without
        these statistics it would see latents of whatever scale the VAE drifted
        to, far from the unit-variance noise it is trained to denoise.
        """
        from diffusers import AutoencoderKLWan

        cfg = self.cfg
        export_cfg = cfg.get("export", {})
        source_config = dict(self.vae.config)
        frame_scale = source_config.pop(FRAME_SCALE_KEY, None)
        vae = AutoencoderKLWan.from_config(source_config)
        vae.load_state_dict(self.trainer.weights("vae", ema=bool(cfg.get("ema"))))
        vae.eval().requires_grad_(False)
        use_onednn_convolutions(vae)  # single-clip encodes on CPU: ~2x faster (see tether.vae)
        frames = int(export_cfg.get("frames", 33))
        if self.train_part == "decoder":
            # the same encoder, the same latents: keep every statistic that defines them
            mean, std = self.vae.config.latents_mean, self.vae.config.latents_std
        else:
            mean, std, measured_scale = latent_statistics(vae, int(export_cfg.get("stats_clips", 32)), frames, self.size)
            frame_scale = measured_scale if export_cfg.get("frame_scale", False) else None
        vae.register_to_config(latents_mean=mean, latents_std=std)
        if frame_scale:
            vae.register_to_config(**{FRAME_SCALE_KEY: list(frame_scale)})
        dtype = getattr(torch, str(export_cfg.get("dtype", "float32")))
        folder = Path(folder)
        torch.nn.Module.to(vae, dtype=dtype).save_pretrained(folder)  # ModelMixin.to warns about fp32-pinned modules; there are none
        # Check what was written, after the cast: the folder is what the pipeline will load.
        codec = LatentCodec(load_vae(folder))
        eval_clips = int(export_cfg.get("eval_clips", 16))
        late_from, late_clip = LATE_FRAMES
        report = {"psnr_db": evaluate_vae(codec, eval_clips, num_frames=frames, size=self.size),
                  # a trained clip is a few latent frames long: how the caches' steady state decodes, in long videos
                  "psnr_db_late_frames": evaluate_vae(codec, max(1, eval_clips // 4), num_frames=late_clip, size=self.size,
                                                      skip=late_from),
                  "late_frames": f"{late_from}-{late_clip - 1} of {late_clip}",
                  "eval_clips": eval_clips, "eval_frames": frames, "size": self.size, "dtype": str(dtype),
                  "steps": self.trainer.total_steps,
                  # how much the decoder amplifies a latent error at each frame index: see decoder_gain_by_frame
                  "decoder_gain_by_latent_frame": decoder_gain_by_frame(codec, 2, num_frames=frames, size=self.size)}
        (folder / "evaluation.json").write_text(json.dumps(report, indent=1) + "\n")
        return report
