"""Analytic FLOP counts of the transformer, from its config and the attention shapes.

Why analytic: a profiler's count depends on the kernels a backend picks, while
the work the model *must* do is fixed by its shapes. Comparing that work with
the wall time gives the fraction of the machine a run really uses.

What is counted (one multiply-add = 2 FLOP, matrix products only):
- every linear layer applied to every query token: 2 · in · out · tokens
  (patch embedding, self-attention q/k/v/o, cross-attention q/o, FFN, head);
- self-attention scores QKᵀ and the weighted sum AV: 2 · 2 · Q · K · dim per layer,
  where K is every key a query sees (the cached frames *plus* the chunk itself);
- cross-attention over the `text_len` padded text tokens: 2 · 2 · Q · text_len · dim.

Left out, on purpose: the cross-attention text K/V (computed once per prompt and
cached, not per forward), the time embedding (per frame, not per token: under
0.01 % of a forward), and biases, norms, RoPE, softmax and other elementwise work
(memory-bound, not FLOP-bound; they are what makes "achieved" fall short of peak).
"""

import math

from .configs import ModelConfig


def linear_flops(tokens: int, in_features: int, out_features: int) -> int:
    return 2 * tokens * in_features * out_features


def forward_flops_by_part(config: ModelConfig, query_tokens: int, key_tokens: int) -> dict:
    """FLOPs of one forward pass, by part: `query_tokens` queries, each seeing `key_tokens` keys."""
    d, layers = config.dim, config.num_layers
    q = query_tokens
    patch_volume = math.prod(config.patch_size)
    return {
        "patch_embedding": linear_flops(q, config.in_channels * patch_volume, d),
        "self_attention_projections": layers * 4 * linear_flops(q, d, d),  # q, k, v, o
        "self_attention_scores": layers * 2 * 2 * q * key_tokens * d,  # QKᵀ and AV
        "cross_attention_projections": layers * 2 * linear_flops(q, d, d),  # q, o (text k/v are cached)
        "cross_attention_scores": layers * 2 * 2 * q * config.text_len * d,
        "ffn": layers * (linear_flops(q, d, config.ffn_dim) + linear_flops(q, config.ffn_dim, d)),
        "head": linear_flops(q, d, patch_volume * config.out_channels),
    }


def forward_flops(config: ModelConfig, query_tokens: int, key_tokens: int) -> int:
    """Total FLOPs of one forward pass (see `forward_flops_by_part`)."""
    return sum(forward_flops_by_part(config, query_tokens, key_tokens).values())


def tokens_per_frame(config: ModelConfig, latent_height: int, latent_width: int) -> int:
    _, ph, pw = config.patch_size
    return (latent_height // ph) * (latent_width // pw)


def forwards_per_chunk(sampler, default: int = 5) -> int:
    """Forward passes a sampler spends on one chunk (Self-Forcing: 4 denoising steps + 1 commit).

    Samplers that denoise several chunks jointly (Rolling Forcing) process more
    query tokens per forward, so for them count the forwards that actually ran
    (`tether.bench.speed` does) rather than multiply this by one chunk's tokens.
    """
    count = getattr(sampler, "forwards_per_chunk", None)
    return count() if callable(count) else default


def chunk_flops(config: ModelConfig, tokens_per_frame: int, chunk_frames: int, cached_frames: int,
                forwards: int = 5) -> int:
    """FLOPs of one chunk: `forwards` passes of the chunk's tokens over the cache plus the chunk itself."""
    query = chunk_frames * tokens_per_frame
    keys = (cached_frames + chunk_frames) * tokens_per_frame
    return forwards * forward_flops(config, query, keys)


def block_causal_flops(config: ModelConfig, tokens_per_frame: int, num_frames: int, chunk_frames: int = 3) -> int:
    """FLOPs of one block-causal forward over `num_frames` frames: each chunk attends to itself and all before it.

    Linear layers are per token, so the pass costs the sum of its chunks'
    forwards, each chunk's queries seeing the keys up to its own end.
    """
    total = 0
    for start in range(0, num_frames, chunk_frames):
        end = min(start + chunk_frames, num_frames)
        total += forward_flops(config, (end - start) * tokens_per_frame, end * tokens_per_frame)
    return total
