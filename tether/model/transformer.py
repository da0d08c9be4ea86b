"""The one transformer: Wan2.1's architecture with explicit temporal positions.

Parameter names are Wan2.1's own (`blocks.N.self_attn.q`, `head.modulation`, ...),
so CausVid, Self-Forcing and LongLive weights load unchanged.

Three ways to run it, all through the same blocks:
- `forward_bidirectional`: every frame sees every frame (teachers, critics).
- `forward_block_causal`: a whole clip with per-frame timesteps, each chunk of
  frames sees itself and earlier chunks (training).
- `forward_cached`: one chunk of queries against keys/values that a memory
  policy supplies (inference). Cached keys are stored *before* RoPE; the caller
  says which temporal index every cached frame and every query frame gets.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..configs import ModelConfig
from .rope import Rope3D, apply_rope


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.to(x.dtype) * self.weight


def layer_norm_fp32(x: torch.Tensor, eps: float) -> torch.Tensor:
    return F.layer_norm(x.float(), x.shape[-1:], eps=eps)


def timestep_sinusoid(timesteps: torch.Tensor, dim: int) -> torch.Tensor:
    """Wan's sinusoidal timestep embedding: [cos | sin], frequencies 10000^(-i/half)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps.float()[..., None] * freqs
    return torch.cat([args.cos(), args.sin()], dim=-1)


@dataclass
class TextContext:
    """Cross-attention keys/values of one batch of prompts, one (k, v) per layer.

    Computed once per prompt and reused for every chunk and denoising step.
    """

    kv: list

    def to(self, device=None, dtype=None):
        return TextContext([(k.to(device=device, dtype=dtype), v.to(device=device, dtype=dtype)) for k, v in self.kv])


class AttentionProjections(nn.Module):
    """q, k, v, o and the RMSNorms on q and k, with Wan's parameter names."""

    def __init__(self, dim: int, num_heads: int, eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = RMSNorm(dim, eps)
        self.norm_k = RMSNorm(dim, eps)

    def queries(self, x):
        return self.norm_q(self.q(x)).unflatten(-1, (self.num_heads, -1))

    def keys_values(self, x):
        """Keys (normed, before RoPE) and values as [B, S, heads, head_dim]."""
        heads = (self.num_heads, -1)
        return self.norm_k(self.k(x)).unflatten(-1, heads), self.v(x).unflatten(-1, heads)


class SelfAttention(AttentionProjections):
    def project(self, x):
        """Queries, pre-RoPE keys and values as [B, S, heads, head_dim]."""
        return (self.queries(x), *self.keys_values(x))


def attend(q, k, v, mask=None):
    """Scaled dot-product attention on [B, S, heads, head_dim] tensors."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2).flatten(2)


class CrossAttention(AttentionProjections):
    def text_kv(self, context):
        return self.keys_values(context)

    def forward(self, x, text_kv):
        k, v = text_kv
        return self.o(attend(self.queries(x), k, v))


class AttentionPlan:
    """How self-attention runs in one forward pass; one object per attention mode.

    `keys_before(layer)` returns already-rotated past keys and values to
    prepend to the current tokens' own (or None); `mask` is an optional dense
    boolean mask over [query tokens, all key tokens]; `query_chunks`, when set,
    splits the queries into contiguous groups (start, end, own_end) that each
    see all past keys plus the current tokens before `own_end` (block-causal
    attention without a dense mask).
    """

    def __init__(self, cos, sin, past=None, mask=None, query_chunks=None, capture=None):
        self.cos, self.sin = cos, sin
        self.past = past
        self.mask = mask
        self.query_chunks = query_chunks
        self.capture = capture

    def keys_before(self, layer: int):
        return None if self.past is None else self.past(layer)


class WanBlock(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.eps = cfg.eps
        self.self_attn = SelfAttention(cfg.dim, cfg.num_heads, cfg.eps)
        self.norm3 = nn.LayerNorm(cfg.dim, eps=cfg.eps, elementwise_affine=True)
        self.cross_attn = CrossAttention(cfg.dim, cfg.num_heads, cfg.eps)
        self.ffn = nn.Sequential(nn.Linear(cfg.dim, cfg.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.ffn_dim, cfg.dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, cfg.dim) / cfg.dim**0.5)

    def forward(self, x, e, text, plan: AttentionPlan, layer: int):
        """x [B, F, T, dim]; e [B, F, 6, dim] per-frame modulation; text: cached (k, v) or the embedded text."""
        text_kv = text if isinstance(text, tuple) else self.cross_attn.text_kv(text)
        shift1, scale1, gate1, shift2, scale2, gate2 = (self.modulation.unsqueeze(0) + e.float()).unsqueeze(3).unbind(2)
        batch, frames, tokens, dim = x.shape

        h = (layer_norm_fp32(x, self.eps) * (1 + scale1) + shift1).to(x.dtype)
        attn = self._self_attention(h.reshape(batch, frames * tokens, dim), plan, layer)
        x = (x.float() + attn.reshape(batch, frames, tokens, dim).float() * gate1).to(x.dtype)

        h = self.norm3(x.float()).to(x.dtype).reshape(batch, frames * tokens, dim)
        x = x + self.cross_attn(h, text_kv).reshape(batch, frames, tokens, dim)

        h = (layer_norm_fp32(x, self.eps) * (1 + scale2) + shift2).to(x.dtype)
        x = (x.float() + self.ffn(h).float() * gate2).to(x.dtype)
        return x

    def _self_attention(self, h, plan: AttentionPlan, layer: int):
        q, k, v = self.self_attn.project(h)
        if plan.capture is not None:
            plan.capture.append((k.detach(), v.detach()))
        q = apply_rope(q, plan.cos, plan.sin)
        k = apply_rope(k, plan.cos, plan.sin)
        past = plan.keys_before(layer)
        past_len = 0
        if past is not None:
            past_len = past[0].shape[1]
            k = torch.cat([past[0].to(k.dtype), k], dim=1)
            v = torch.cat([past[1].to(v.dtype), v], dim=1)
        if plan.query_chunks is None:
            out = attend(q, k, v, plan.mask)
        else:
            out = torch.cat([attend(q[:, a:b], k[:, :past_len + end], v[:, :past_len + end])
                             for a, b, end in plan.query_chunks], dim=1)
        return self.self_attn.o(out)


class Head(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.eps = cfg.eps
        self.head = nn.Linear(cfg.dim, math.prod(cfg.patch_size) * cfg.out_channels)
        self.modulation = nn.Parameter(torch.randn(1, 2, cfg.dim) / cfg.dim**0.5)

    def forward(self, x, e):
        """x [B, F, T, dim]; e [B, F, dim] (the time embedding before projection)."""
        shift, scale = (self.modulation.unsqueeze(0) + e.float().unsqueeze(2)).unsqueeze(3).unbind(2)
        return self.head((layer_norm_fp32(x, self.eps) * (1 + scale) + shift).to(x.dtype))


class WanTransformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.patch_embedding = nn.Conv3d(cfg.in_channels, cfg.dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, cfg.dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.dim, cfg.dim))
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, cfg.dim), nn.SiLU(), nn.Linear(cfg.dim, cfg.dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(cfg.dim, 6 * cfg.dim))
        self.blocks = nn.ModuleList([WanBlock(cfg) for _ in range(cfg.num_layers)])
        self.head = Head(cfg)
        self.rope = Rope3D(cfg.head_dim, cfg.rope_theta)
        self.gradient_checkpointing = False

    # ---- conditioning -------------------------------------------------
    def encode_text(self, text: torch.Tensor) -> TextContext:
        """Cross-attention K/V for text embeddings [B, L, text_dim], to reuse across chunks and steps."""
        context = self.embed_text(text)
        return TextContext([block.cross_attn.text_kv(context) for block in self.blocks])

    def embed_text(self, text: torch.Tensor) -> torch.Tensor:
        """The text embedding MLP's output [B, text_len, dim].

        Wan zero-pads every prompt to `text_len` tokens before the MLP, and the
        padded positions take part in cross-attention, so padding is part of
        the model's behaviour, not an optimisation detail.
        """
        length = self.config.text_len
        if text.shape[1] < length:
            text = F.pad(text, (0, 0, 0, length - text.shape[1]))
        return self.text_embedding(text.to(self.dtype))

    def _time(self, timestep: torch.Tensor, batch: int, frames: int):
        """Per-frame time embedding e [B, F, dim] and block modulation e0 [B, F, 6, dim]."""
        timestep = torch.as_tensor(timestep, device=self.device)
        if timestep.ndim == 0:
            timestep = timestep.expand(batch)
        if timestep.ndim == 1:
            timestep = timestep[:, None].expand(batch, frames)
        sinusoid = timestep_sinusoid(timestep, self.config.freq_dim).to(self.dtype)
        e = self.time_embedding(sinusoid)
        e0 = self.time_projection(e).unflatten(-1, (6, self.config.dim))
        return e, e0

    @property
    def dtype(self):
        return self.patch_embedding.weight.dtype

    @property
    def device(self):
        return self.patch_embedding.weight.device

    # ---- the shared trunk ---------------------------------------------
    def _run(self, latents, timestep, text, frame_positions, plan_args):
        cfg = self.config
        batch, _, frames, height, width = latents.shape
        pt, ph, pw = cfg.patch_size
        grid = (frames // pt, height // ph, width // pw)
        x = self.patch_embedding(latents.to(self.dtype))  # [B, dim, F', h, w]
        x = x.flatten(3).permute(0, 2, 3, 1)  # [B, F', h*w, dim]
        e, e0 = self._time(timestep, batch, grid[0])
        # Raw text is embedded once here and turned into K/V inside each block, where
        # a sharded (FSDP2) block has its weights gathered.
        per_layer = text.kv if isinstance(text, TextContext) else [self.embed_text(text)] * len(self.blocks)
        cos, sin = self.rope.cos_sin(frame_positions, grid[1], grid[2], device=x.device)
        plan = AttentionPlan(cos, sin, **plan_args)
        for layer, block in enumerate(self.blocks):
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, e0, per_layer[layer], plan, layer, use_reentrant=False)
            else:
                x = block(x, e0, per_layer[layer], plan, layer)
        out = self.head(x, e)  # [B, F', h*w, pt*ph*pw*C]
        return self._unpatchify(out, grid), plan

    def _unpatchify(self, x, grid):
        f, h, w = grid
        pt, ph, pw = self.config.patch_size
        c = self.config.out_channels
        x = x.reshape(x.shape[0], f, h, w, pt, ph, pw, c)
        return x.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(x.shape[0], c, f * pt, h * ph, w * pw)

    def tokens_per_frame(self, height: int, width: int) -> int:
        _, ph, pw = self.config.patch_size
        return (height // ph) * (width // pw)

    # ---- the three attention modes ------------------------------------
    def forward_bidirectional(self, latents, timestep, text, frame_positions=None):
        """Flow prediction for latents [B, C, F, H, W]; timestep [B] or [B, F]; text [B, L, text_dim] or TextContext."""
        if frame_positions is None:
            frame_positions = torch.arange(latents.shape[2])
        return self._run(latents, timestep, text, frame_positions, {})[0]

    forward = forward_bidirectional

    def forward_block_causal(self, latents, timestep, text, chunk_size: int = 3, frame_positions=None):
        """Training mode: chunk i of `chunk_size` frames sees chunks 0..i; per-frame timesteps [B, F]."""
        frames = latents.shape[2]
        if frame_positions is None:
            frame_positions = torch.arange(frames)
        query_chunks = self._query_chunks(latents, chunk_size)
        return self._run(latents, timestep, text, frame_positions, {"query_chunks": query_chunks})[0]

    def _query_chunks(self, latents, chunk_size: int):
        frames = latents.shape[2]
        tokens = self.tokens_per_frame(*latents.shape[3:])
        return [(start * tokens, min(start + chunk_size, frames) * tokens, min(start + chunk_size, frames) * tokens)
                for start in range(0, frames, chunk_size)]

    def forward_masked(self, latents, timestep, text, frame_mask, frame_positions=None):
        """Any frame-level visibility: frame_mask [F_q, F_k] bool, True where a query frame may see a key frame."""
        frames = latents.shape[2]
        if frame_positions is None:
            frame_positions = torch.arange(frames)
        tokens = self.tokens_per_frame(*latents.shape[3:])
        mask = frame_mask.to(self.device).repeat_interleave(tokens, 0).repeat_interleave(tokens, 1)
        return self._run(latents, timestep, text, frame_positions, {"mask": mask})[0]

    def forward_cached(self, latents, timestep, text, query_positions, past=None, capture: bool = False,
                       chunk_size: int | None = None):
        """Inference on one chunk against memory.

        `past(layer)` returns rotated keys and values [B, S, heads, head_dim] of
        the cached frames (or None). With `capture`, also returns each layer's
        pre-RoPE keys and values of this chunk, for the memory to commit. With
        `chunk_size`, the query frames are block-causal among themselves (all
        of them still see all of `past`), as when re-encoding several chunks.
        """
        plan_args = {"past": past, "capture": [] if capture else None}
        if chunk_size is not None:
            plan_args["query_chunks"] = self._query_chunks(latents, chunk_size)
        out, plan = self._run(latents, timestep, text, query_positions, plan_args)
        return (out, plan.capture) if capture else out

    def rotate_keys(self, keys: torch.Tensor, frame_positions, height: int, width: int) -> torch.Tensor:
        """Apply RoPE to pre-RoPE keys [B, F*h*w, heads, head_dim] at the given frame positions."""
        cos, sin = self.rope.cos_sin(frame_positions, height, width, device=keys.device)
        return apply_rope(keys, cos, sin)
