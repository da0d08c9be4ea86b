"""Per-GPU memory of a training recipe, computed before launch ("will it fit?").

`estimate(cfg, world_size, accumulation)` walks what `Trainer` and the recipe
in `cfg` hold on one GPU, phase by phase, and returns the peak with a
breakdown; `tether train RECIPE --scale wan1.3b --estimate-memory --nproc N`
prints it. Nothing is allocated: models are built on the meta device to count
their parameters exactly.

What is counted, and the assumptions behind each line (rank 0, the rank with
the most rows of every FSDP shard):

Model state (`Trainer.add_model` / `add_optimizer`; checked exactly against a
real trainer by `tests/test_memory_estimate.py`):
- Trainable models are sharded by FSDP2 when world_size > 1: fp32 master
  weights, fp32 gradients and AdamW's two fp32 moments, each parameter split
  on dim 0 into ceil(rows / world) rows (FSDP2 pads to equal shards). Frozen
  parameters inside a trainable model (cf-teacher's LoRA base) are sharded
  weights without gradients or moments. With one process nothing is sharded.
- EMA: an fp32 copy of the trainable parameters, on each rank's own shard.
- Frozen models (DMD real scores, the ode-init teacher) are cast to bf16 under
  mixed precision (GPU; else they stay fp32) and, when world_size > 1, sharded
  by FSDP2 exactly like trainable models (`Trainer._shard`: each block, then
  the root): every rank holds its ceil(rows / world) rows of each bf16
  parameter, no gradients, no moments. While one runs (DMD scoring, the
  ode-init teacher's trajectory) it has the same FSDP2 working buffers as a
  trainable model's forward (below); it never runs backward. One difference
  follows from that: `fully_shard`'s default leaves the *root* unit (the
  non-block weights: 0.43 GiB bf16 at 14B) unsharded after forward, since a
  backward would need it at once, and only the post-backward callback
  reshards it; a frozen model has no backward, so from its first forward on
  its root weights stay gathered, counted as resident. (A trainable model's
  root likewise stays gathered after a gradient-free forward until its own
  next backward: the generator's, through the critic's update.) With one
  process the frozen model is whole. Checked exactly against a real
  2-process trainer (CPU, gloo) by `tests/test_memory_estimate.py`.
- AdamW's `step` counters are CPU scalars (not GPU memory); the optimiser step
  itself (foreach) allocates ~2 fp32 temporaries of the trained shard.
- Gradient accumulation with world_size > 1: micro-batches before the last run
  with gradient sync off, and FSDP2 then keeps the *unsharded* gradients of
  every trainable parameter, upcast to fp32 (its reduce dtype), until the
  last micro-batch reduce-scatters them. So accumulation 1 -> 2 adds one full
  fp32 gradient copy per GPU; 2 -> 8 adds nothing.
- One GPU with mixed precision: fp32 weights with autocast, which caches a bf16
  copy of every trainable weight it uses until the step's autocast region ends.
- FSDP2 working buffers: the bf16 unsharded weights of two blocks (the one
  computing and the one prefetched) plus the root's non-block weights, for a
  trainable or a frozen model alike (a frozen model's root is already
  gathered, above); in backward (trainable models only) also
  one block's unsharded bf16 gradients and their fp32 copy for the
  reduce-scatter.

Activations (bf16 under mixed precision, fp32 otherwise; B = per-rank batch;
N = tokens per latent frame, 1560 at 480x832: 60x104 latents, 2x2 patches):
- Activation checkpointing (every Wan config sets it): a forward with
  gradients keeps each block's input, layers x tokens x dim, and during
  backward one block is recomputed at a time. Its working set is the tensors
  autograd saves inside `WanBlock.forward`, counted from the code: 12 fp32
  tensors of width dim per query token (LayerNorm inputs/outputs, RMSNorm and
  RoPE fp32 copies of q and k, gate products), 11 in the activation dtype,
  the FFN hidden twice (2 x ffn_dim), the attention's keys and values over
  every key token, the prompt's cross-attention K/V (on CPU in bf16 the
  tensors autograd really saves come to 1.05x this count); its recompute +
  backward is taken to peak at `BACKWARD_FACTOR` (1.1) x that (measured 0.93
  in bf16 on CPU; the margin is for GPU kernel workspaces).
- Attention is SDPA with a flash/memory-efficient kernel (GPU): no
  tokens x tokens score matrix is ever stored.
- A gradient-free forward holds, per token, the block input and the largest
  transient: the FFN's hidden twice (ffn0 output and GELU output) or the fp32
  LayerNorm path (three fp32 copies of width dim). Blocks run one at a time.
- Self-Forcing rollouts (self-forcing, cf-stage1/2, gf-stage1/2): the memory
  policy's KV cache (K and V, all layers, bf16: 2 x layers x N x dim x 2 bytes
  per latent frame = 274 MiB at 1.3B) up to the policy's `max_frames`; each
  chunk's `AttentionView` (rotated keys + concatenated values of the frames it
  attends to, all layers) - and, for the chunks inside the gradient window
  (the last `grad_frames` = 21 latent frames), that view, its cached frames
  and the chunk's checkpointed block inputs stay alive until backward,
  because the checkpoint keeps the attention plan for its recompute; so
  frames the policy has evicted stay alive while a kept view lists them.
  Each commit pass briefly holds one chunk's captured K/V and its cached copy.
  Validated on CPU against profiled toy steps (bench/memory_validation.py):
  the step-time part comes to 0.94-1.29x the measured peak.
- DMD scoring runs while the generator's rollout graph is alive: the real
  score with CFG sees batch 2B (cond | uncond), the critic batch B, over the
  judged window (21 frames; cf-stage2 adds up to 21 context frames: sink 3 +
  slow 12 + motion 6). One score runs at a time, with its FSDP2 working
  buffers (on several GPUs) on top of its activations.
- Text: recipes take precomputed umt5-xxl embeddings ([B, 512, 4096]); no
  recipe keeps the text encoder (5.7B parameters) or the VAE on the GPU, so
  neither is counted. cf-teacher's error bank lives in host memory (reported
  under `host`), as do ode-init's on-disk trajectory caches.
- ode-init keeps `ode.pool` batches of trajectories (4 states, x0 and the text
  embedding, fp32) on the GPU once computed: counted in full.

Not counted: the CUDA context, NCCL and allocator fragmentation are a fixed
`RUNTIME_OVERHEAD_GIB`; torch.compile workspaces; logging. The estimate is
an upper bound within each phase (a phase's live tensors are added at their
largest, e.g. the whole rollout graph while the first block is recomputed).

Setup: `Trainer.add_model` moves a trainable model to the GPU whole, in
fp32, before sharding it, so loading puts its full fp32 copy on the GPU for a
moment. A frozen model is cast to bf16 on the CPU first (under mixed
precision), then moved whole and sharded: its full *bf16* copy is on the GPU
for a moment (a 14B real score: 26.6 GiB; no fp32 copy any more). The largest
such transient, over the models already placed, is the `setup` phase.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

GIB = 1024 ** 3

#: Usable memory of common GPUs, GiB (what `torch.cuda.mem_get_info` reports on an idle card).
GPUS = {"40 GB (A100-40GB)": 39.4, "80 GB (A100/H100-80GB)": 79.1, "141 GB (H200)": 139.8}

#: CUDA context, NCCL communicators and allocator fragmentation, per GPU.
RUNTIME_OVERHEAD_GIB = 2.0

#: What autograd saves inside one `WanBlock` forward, per query token, in units of dim (counted from the code):
#: 12 fp32 tensors (LayerNorm inputs/outputs, RMSNorm and RoPE fp32 copies, the gate products) ...
GRAD_FP32_PER_TOKEN_DIM = 12
#: ... and 11 in the activation dtype (normed inputs, q/k, attention outputs and their flattened copies);
#: the FFN hidden is saved twice (ffn0 output, GELU output), 2 x ffn_dim per token; keys and values 2 x dim per key token.
GRAD_ACT_PER_TOKEN_DIM = 11
#: One block's recompute + backward peak relative to its saved tensors (weight gradients excluded: counted
#: under FSDP). Measured on CPU (bench/memory_validation.py): 0.93 in bf16, 0.72 in fp32; 1.1 leaves room for
#: the GPU kernels' workspaces (flash-attention backward, cuBLAS), which a CPU run does not have.
BACKWARD_FACTOR = 1.1


# ---- the models a recipe holds ---------------------------------------------------------------
@dataclass
class ModelPlan:
    name: str
    config: object  # ModelConfig
    trainable: bool
    ema: bool = False
    lora: dict | None = None


def _named_config(source, fallback):
    """The ModelConfig a source names: a named config, a checkpoint whose config can be read without its
    weights (tether .safetensors, a Wan or diffusers folder), or else (a run folder not trained yet) `fallback`."""
    import json

    from .. import checkpoints as ck
    from ..configs import CONFIGS, ModelConfig

    if isinstance(source, str) and source in CONFIGS:
        return CONFIGS[source]
    if source is None or not Path(str(source)).exists():
        return fallback
    path = Path(str(source))
    try:
        kind = ck.detect_format(path)
        if kind == "tether":
            metadata, _ = ck._safetensors_header(path)
            return ModelConfig.from_dict(json.loads(metadata[ck.TETHER_METADATA_KEY]))
        if kind in ("wan", "diffusers") and path.is_dir():
            folder = path / "transformer" if (path / "transformer").is_dir() else path
            stated = json.loads((folder / "config.json").read_text())
            read = ck._config_fields_from_wan_json if kind == "wan" else ck._config_fields_from_diffusers_json
            fields = read(stated, folder / "config.json")
            fields.setdefault("text_len", fallback.text_len)
            return ModelConfig(**fields)
    except Exception:  # unreadable without loading it: the fallback (the estimate lists the config it used)
        pass
    return fallback


def model_plans(cfg: dict, default_config) -> list:
    """The models `cfg`'s recipe registers with the trainer, in registration order."""
    recipe = cfg["recipe"]
    student = _named_config(cfg["model"].get("config") or cfg["model"].get("source"), default_config)
    ema = cfg.get("ema") is not None

    lora = cfg.get("lora") if recipe != "teacher" else None  # adapters on the trained model (see train/lora.py)
    if recipe in ("teacher", "cf-teacher"):
        return [ModelPlan("model", student, True, ema=ema, lora=lora)]
    teacher_source = (cfg.get("teacher") or {}).get("source") or cfg["model"]["source"]
    critic_source = (cfg.get("critic") or {}).get("source") or teacher_source
    if recipe == "ode-init":
        return [ModelPlan("generator", student, True, ema=ema, lora=lora),
                ModelPlan("teacher", _named_config(teacher_source, student), False)]
    if recipe in DMD_RECIPES:
        return [ModelPlan("generator", student, True, ema=ema, lora=lora),
                ModelPlan("real_score", _named_config(teacher_source, student), False),
                ModelPlan("critic", _named_config(critic_source, student), True)]
    raise ValueError(f"no memory model for recipe '{recipe}'")


DMD_RECIPES = ("self-forcing", "cf-stage1", "cf-stage2", "gf-stage1", "gf-stage2")
RECIPES = ("teacher", "cf-teacher", "ode-init") + DMD_RECIPES


def parameter_shapes(config, lora: dict | None = None) -> list:
    """[(name, shape, requires_grad)] of a WanTransformer (with LoRA adapters), built on the meta device."""
    import torch

    from ..model import WanTransformer

    with torch.device("meta"):
        model = WanTransformer(config)
        if lora:
            from .lora import add_lora

            model = add_lora(model, lora)
    return [(n, tuple(p.shape), p.requires_grad) for n, p in model.named_parameters()]


def shard_numel(shape, world: int) -> int:
    """Elements rank 0 holds of a parameter FSDP2 shards on dim 0 over `world` ranks."""
    if world <= 1 or not shape:
        return math.prod(shape)
    return math.ceil(shape[0] / world) * math.prod(shape[1:])


@dataclass
class ModelCounts:
    total: int  # every parameter of the model
    trainable: int
    block: int  # the largest block's parameters (an FSDP unit)
    block_trainable: int  # of which trainable (LoRA: the adapters)
    root: int  # parameters outside the blocks (the root FSDP unit)
    shard_total: int  # rank 0's share of every parameter (sharded or not, see `sharded`)
    shard_trainable: int
    sharded: bool


def count(plan: ModelPlan, world: int) -> ModelCounts:
    shapes = parameter_shapes(plan.config, plan.lora if plan.trainable else None)
    sharded = world > 1  # Trainer.add_model shards trainable and frozen models alike on several ranks
    w = world if sharded else 1
    blocks, blocks_trainable = {}, {}
    for name, shape, requires_grad in shapes:
        if name.startswith("blocks."):
            key = name.split(".")[1]
            blocks[key] = blocks.get(key, 0) + math.prod(shape)
            blocks_trainable[key] = blocks_trainable.get(key, 0) + (math.prod(shape) if requires_grad else 0)
    trainable = [(s, g) for _, s, g in shapes]
    return ModelCounts(
        total=sum(math.prod(s) for s, _ in trainable),
        trainable=sum(math.prod(s) for s, g in trainable if g) if plan.trainable else 0,
        block=max(blocks.values(), default=0),
        block_trainable=max(blocks_trainable.values(), default=0) if plan.trainable else 0,
        root=sum(math.prod(s) for n, s, _ in shapes if not n.startswith("blocks.")),
        shard_total=sum(shard_numel(s, w) for s, _ in trainable),
        shard_trainable=sum(shard_numel(s, w) for s, g in trainable if g) if plan.trainable else 0,
        sharded=sharded,
    )


# ---- activation pieces --------------------------------------------------------------------------
def kv_frame_bytes(config, tokens_per_frame: int, batch: int, act: int) -> int:
    """K and V of one latent frame over all layers."""
    return 2 * config.num_layers * tokens_per_frame * config.dim * act * batch


def boundary_bytes(config, tokens: int, batch: int, act: int) -> int:
    """Checkpointed block inputs of one forward with gradients, plus the head's saved tensors."""
    return (config.num_layers + 2) * tokens * config.dim * act * batch


def block_grad_working_bytes(config, query_tokens: int, key_tokens: int, batch: int, act: int, lora_rank: int = 0) -> int:
    """One block recomputed in backward: what autograd saves in it, plus gradient buffers (BACKWARD_FACTOR)."""
    per_query = (4 * GRAD_FP32_PER_TOKEN_DIM + act * GRAD_ACT_PER_TOKEN_DIM) * config.dim + 2 * act * config.ffn_dim
    per_query += 8 * lora_rank * act  # LoRA A outputs of q, k, v, o in both attentions
    per_key = 2 * config.dim * act  # keys and values the attention saves (past + current)
    text = 2 * config.text_len * config.dim * act  # cross-attention K/V of the prompt
    return int(BACKWARD_FACTOR * batch * (query_tokens * per_query + key_tokens * per_key + text))


def nograd_forward_bytes(config, tokens: int, batch: int, act: int, key_tokens: int = 0) -> int:
    """Peak of a gradient-free forward: one block's largest transient, plus the attention's past K/V."""
    # block input + the fp32 LayerNorm path (x.float(), its norm, the modulated copy), or
    # block input + normed input + the FFN hidden twice (ffn0 output, GELU output)
    per_token = max((act + 12) * config.dim, 2 * act * config.dim + 2 * act * config.ffn_dim)
    past = 2 * key_tokens * config.dim * act
    return batch * (tokens * per_token + past)


# ---- the estimate ---------------------------------------------------------------------------------
@dataclass
class Item:
    what: str
    bytes: int
    kind: str  # state | fsdp | activations | kv | data | overhead

    @property
    def gib(self) -> float:
        return self.bytes / GIB


@dataclass
class Phase:
    name: str
    items: list = field(default_factory=list)

    @property
    def bytes(self) -> int:
        return sum(i.bytes for i in self.items)


@dataclass
class Estimate:
    recipe: str
    world_size: int
    accumulation: int
    batch_per_rank: int
    mixed_precision: bool
    models: dict
    phases: list
    host: list
    assumptions: dict

    @property
    def peak(self) -> Phase:
        return max(self.phases, key=lambda p: p.bytes)

    @property
    def peak_training(self) -> Phase:
        """The largest phase once training runs (setup excluded)."""
        return max((p for p in self.phases if p.name != "setup"), key=lambda p: p.bytes)

    def verdicts(self) -> dict:
        peak = self.peak.bytes / GIB
        return {gpu: ("fits" if peak <= cap * 0.95 else "tight" if peak <= cap else "does not fit")
                + f" ({cap - peak:+.1f} GiB)" for gpu, cap in GPUS.items()}

    def to_dict(self) -> dict:
        return {
            "recipe": self.recipe, "world_size": self.world_size, "accumulation": self.accumulation,
            "batch_per_rank": self.batch_per_rank, "global_batch": self.batch_per_rank * self.world_size * self.accumulation,
            "mixed_precision": self.mixed_precision, "models": self.models,
            "peak_gib": round(self.peak.bytes / GIB, 2), "peak_phase": self.peak.name,
            "peak_training_gib": round(self.peak_training.bytes / GIB, 2), "peak_training_phase": self.peak_training.name,
            "verdicts": self.verdicts(),
            "phases": [{"phase": p.name, "total_gib": round(p.bytes / GIB, 3),
                        "items": [{"what": i.what, "kind": i.kind, "gib": round(i.gib, 3), "bytes": i.bytes}
                                  for i in p.items]} for p in self.phases],
            "host": [{"what": i.what, "gib": round(i.gib, 3), "bytes": i.bytes} for i in self.host],
            "assumptions": self.assumptions,
            "computed_not_measured": True,
        }


def _dmd_frames(cfg: dict, chunk: int) -> int:
    """The longest rollout (latent frames) the recipe can draw over its run."""
    recipe = cfg["recipe"]
    roll = cfg.get("rollout", {}) or {}
    data_frames = int((cfg.get("data") or {}).get("frames", 21))
    if recipe in ("self-forcing", "gf-stage1"):
        return data_frames - data_frames % chunk
    if recipe == "gf-stage2":
        low, high = roll.get("frames", [42, 84])
        return max(max(1, int(low) // chunk), int(high) // chunk) * chunk
    from .recipes.context_forcing import chunk_range

    default = (6, 21) if recipe == "cf-stage1" else (42, 120)
    low, high = chunk_range(roll.get("frames", default), chunk)
    if recipe == "cf-stage2":  # the curriculum's longest allowed at the last step
        steps, span = int(cfg.get("steps", 1)), int(cfg.get("curriculum_steps", 600))
        high = low + int(min(1.0, (steps - 1) / max(1, span)) * (high - low))
    return high * chunk


def _policy_frames(cfg: dict, chunk: int) -> int:
    from ..memory import make_policy
    from .recipes.context_forcing import ContextForcingStage1
    from .recipes.grounded_forcing import GroundedForcingStage1
    from .recipes.self_forcing import SelfForcing

    roll = cfg.get("rollout", {}) or {}
    default = {"cf-stage1": ContextForcingStage1, "cf-stage2": ContextForcingStage1, "gf-stage1": GroundedForcingStage1,
               "gf-stage2": GroundedForcingStage1}.get(cfg["recipe"], SelfForcing).default_policy
    policy = make_policy(roll.get("policy", default), chunk_frames=chunk, **dict(roll.get("policy_options") or {}))
    return int(policy.max_frames)


def estimate(cfg: dict, world_size: int = 1, accumulation: int | None = None, mixed_precision: bool = True,
             default_config=None) -> Estimate:
    """Per-GPU memory of `cfg`'s recipe on `world_size` GPUs with `accumulation` micro-batches (default: the config's).

    `mixed_precision`: bf16 as the trainer runs on GPU; False for the CPU trainer (fp32 everywhere).
    `default_config`: the ModelConfig of a `model.source` that does not exist yet (a run folder to be trained).
    """
    from ..configs import CONFIGS

    recipe = cfg["recipe"]
    if recipe not in RECIPES:
        raise ValueError(f"no memory model for recipe '{recipe}' (known: {', '.join(RECIPES)})")
    world = max(1, int(world_size))
    accumulation = int(cfg.get("accumulation", 1) if accumulation is None else accumulation)
    batch = int(cfg.get("batch_size", 1))
    act = 2 if mixed_precision else 4
    weight_frozen = 2 if mixed_precision else 4
    default_config = default_config or CONFIGS["wan2.1-t2v-1.3b"]
    plans = model_plans(cfg, default_config)
    counts = {p.name: count(p, world) for p in plans}
    by_name = {p.name: p for p in plans}
    student = plans[0].config
    data = cfg.get("data") or {}
    height, width = int(data.get("height", 60)), int(data.get("width", 104))
    _, ph, pw = student.patch_size
    tokens_per_frame = (height // ph) * (width // pw)
    fsdp = world > 1
    assumptions = {"tokens_per_latent_frame": tokens_per_frame, "activation_bytes": act,
                   "activation_checkpointing": bool(cfg.get("activation_checkpointing", False)),
                   "runtime_overhead_gib": RUNTIME_OVERHEAD_GIB if mixed_precision else 0.0}

    # -- what lives the whole run ------------------------------------------------------------------
    persistent = []
    for plan in plans:
        c = counts[plan.name]
        if plan.trainable:
            where = f"sharded 1/{world}" if c.sharded else "unsharded"
            persistent.append(Item(f"{plan.name} weights, fp32 ({where})", 4 * c.shard_total, "state"))
            persistent.append(Item(f"{plan.name} AdamW moments, fp32 ({where})", 8 * c.shard_trainable, "state"))
            if plan.ema:
                persistent.append(Item(f"{plan.name} EMA, fp32 ({where})", 4 * c.shard_trainable, "state"))
        else:
            dtype = "bf16" if mixed_precision else "fp32"
            where = f"frozen, sharded 1/{world}" if c.sharded else "frozen, whole"
            persistent.append(Item(f"{plan.name} weights, {dtype} ({where})", weight_frozen * c.shard_total, "state"))
            if c.sharded:  # FSDP2 keeps the root unit gathered after forward; only a backward would reshard it
                persistent.append(Item(f"{plan.name}: root weights left all-gathered after its first forward ({dtype})",
                                       weight_frozen * c.root, "fsdp"))
    if recipe == "ode-init":
        ode = cfg.get("ode") or {}
        if ode.get("pool"):
            frames = int(data.get("frames", 21))
            per_key = batch * student.in_channels * frames * height * width * 4 * (len(cfg.get("denoising_steps", [0] * 4)) + 1)
            per_key += batch * student.text_len * student.text_dim * 4
            keys = min(int(ode["pool"]), int(cfg.get("steps", 1))) * accumulation
            persistent.append(Item(f"ode-init trajectory pool on the GPU ({keys} batches)", keys * per_key, "data"))
    if mixed_precision:
        persistent.append(Item("CUDA context, NCCL, allocator slack (assumed)", int(RUNTIME_OVERHEAD_GIB * GIB), "overhead"))

    def grads(name: str, backward: bool) -> list:
        """Gradient memory of `name` while it accumulates (micro > 0) or runs backward."""
        c = counts[name]
        items = []
        if backward:
            where = f"sharded 1/{world}" if c.sharded else "unsharded"
            items.append(Item(f"{name} gradients, fp32 ({where})", 4 * c.shard_trainable, "state"))
        if c.sharded and c.trainable and accumulation > 1:
            items.append(Item(f"{name} unsharded fp32 gradients kept between micro-batches (FSDP2 no-sync)",
                              4 * c.trainable, "state"))
        return items

    def working(name: str, backward: bool = False) -> list:
        """FSDP2 unsharded buffers (or the autocast weight cache on one GPU) while `name` computes."""
        plan, c = by_name[name], counts[name]
        if c.sharded and not plan.trainable:  # its root stays gathered all run (counted with the weights)
            return [Item(f"{name}: all-gathered {'bf16' if mixed_precision else 'fp32'} weights (2 blocks)",
                         2 * c.block * (act if mixed_precision else 4), "fsdp")]
        if c.sharded:
            gathered = (2 * c.block + c.root) * act
            items = [Item(f"{name}: all-gathered bf16 weights (2 blocks + root)", gathered, "fsdp")]
            if backward and plan.trainable:
                items.append(Item(f"{name}: one block's unsharded grads + fp32 reduce-scatter copy", c.block_trainable * (act + 4),
                                  "fsdp"))
            return items
        if plan.trainable and mixed_precision:
            return [Item(f"{name}: autocast bf16 weight copies (one GPU)", 2 * c.total, "fsdp")]
        return []

    phases = []

    # -- setup: each model arrives on the GPU whole before it is sharded: a trainable one in fp32, a frozen one
    # already cast on the CPU (bf16 under mixed precision) ----------------------------------------------
    setup_worst, held = None, 0
    for plan in plans:
        c = counts[plan.name]
        whole = (4 if plan.trainable else weight_frozen) * c.total
        moment = held + whole
        if setup_worst is None or moment > setup_worst[1]:
            setup_worst = (plan.name, whole, held, plan.trainable)
        held += (4 if plan.trainable else weight_frozen) * c.shard_total
    name, whole, before, trainable = setup_worst
    copy = "fp32" if trainable or not mixed_precision else "bf16 (cast on the CPU)"
    phases.append(Phase("setup", [Item("models already placed", before, "state"),
                                  Item(f"{name}: whole {copy} copy moved to the GPU before "
                                       f"{'sharding' if counts[name].sharded else 'use'}", whole, "state")]
                        + ([persistent[-1]] if mixed_precision else [])))

    ckpt = bool(cfg.get("activation_checkpointing", False))

    def grad_forward(config, q_tokens: int, k_tokens: int, lora_rank: int = 0) -> tuple:
        """(kept until backward, peak working set in backward) of one forward with gradients."""
        if ckpt:
            kept = boundary_bytes(config, q_tokens, batch, act)
            work = block_grad_working_bytes(config, q_tokens, k_tokens, batch, act, lora_rank)
        else:  # every block's saved tensors stay
            kept = config.num_layers * block_grad_working_bytes(config, q_tokens, k_tokens, batch, act, lora_rank) // 2
            work = block_grad_working_bytes(config, q_tokens, k_tokens, batch, act, lora_rank) // 2
        return kept, work

    def one_forward(name: str, label: str, kept: Item, work: int, extra=()) -> list:
        """A forward with gradients, then its backward: every block input is alive while the last block is
        recomputed; the parameter gradients fill in as the backward proceeds and the block inputs go."""
        c = counts[name]
        one_block = 4 * (math.ceil(c.block_trainable / world) if c.sharded else c.block_trainable)
        return [
            Phase(f"{label} forward + backward", persistent + list(extra) + grads(name, False) + working(name, True)
                  + [Item(f"{name} gradients of the first block done", one_block, "state"), kept,
                     Item("one block recomputed in backward (+ its gradient buffers)", work, "activations")]),
            Phase(f"{label} end of backward", persistent + list(extra) + grads(name, True) + working(name, True)
                  + [Item("the first block recomputed in backward", work, "activations")]),
        ]

    if recipe in ("teacher", "cf-teacher"):
        frames = int(data.get("frames", 21))
        if recipe == "cf-teacher":
            from .recipes.cf_teacher import SINK, SPARSE, MOTION, TARGET, plan_layout

            frames = len(plan_layout(frames).frames)
            assumptions["cf_teacher_layout_frames"] = frames
            bins = int((cfg.get("erft") or {}).get("bins", 50))
            capacity = int((cfg.get("erft") or {}).get("capacity", 500))
            bank_dtype = 2 if (cfg.get("erft") or {}).get("dtype", "float32") in ("bfloat16", "float16") else 4
            host = [Item("cf-teacher error bank (host RAM, every rank)",
                         2 * bins * capacity * student.in_channels * height * width * bank_dtype, "host")]
        else:
            host = []
        tokens = frames * tokens_per_frame
        lora_rank = int((by_name["model"].lora or {}).get("rank", 0)) if by_name["model"].lora else 0
        kept, work = grad_forward(student, tokens, tokens, lora_rank)
        phases += one_forward("model", "model", Item(f"checkpointed block inputs ({frames} frames x {tokens_per_frame} tokens)",
                                                     kept, "activations"), work)
        phases.append(Phase("optimizer step", persistent + grads("model", True)[:1] + [
            Item("AdamW foreach temporaries", 8 * counts["model"].shard_trainable, "state")]))
    elif recipe == "ode-init":
        host = []
        frames = int(data.get("frames", 21))
        tokens = frames * tokens_per_frame
        guidance = float((cfg.get("ode") or {}).get("guidance", 5.0))
        copies = 1 if guidance == 1 else 2
        teacher = by_name["teacher"].config
        phases.append(Phase("teacher ODE trajectory (no grad)", persistent + grads("generator", False) + working("teacher") + [
            Item(f"teacher forward, batch {copies}B x {tokens} tokens (no grad)",
                 nograd_forward_bytes(teacher, tokens, copies * batch, act), "activations")]))
        kept, work = grad_forward(student, tokens, tokens)
        phases += one_forward("generator", "generator", Item(f"checkpointed block inputs ({frames} frames, block-causal)",
                                                             kept, "activations"), work)
        phases.append(Phase("optimizer step", persistent + grads("generator", True)[:1] + [
            Item("AdamW foreach temporaries", 8 * counts["generator"].shard_trainable, "state")]))
    else:
        host = []
        chunk = int(cfg.get("chunk_frames", 3))
        grad_frames = int((cfg.get("rollout") or {}).get("grad_frames", 21))
        rollout_frames = _dmd_frames(cfg, chunk)
        max_frames = _policy_frames(cfg, chunk)
        target = grad_frames
        context = 0
        if recipe == "cf-stage2":
            from .recipes.cf_teacher import MOTION, SINK, SPARSE

            target = max(chunk, min(grad_frames, rollout_frames - chunk))
            context = min(rollout_frames - target, SINK + SPARSE + MOTION)
        target = min(target, rollout_frames)
        assumptions.update({"rollout_frames_max": rollout_frames, "policy_max_frames": max_frames,
                            "grad_frames": grad_frames, "score_frames": context + target})
        kv = kv_frame_bytes(student, tokens_per_frame, batch, act)
        chunks = rollout_frames // chunk
        grad_start = max(0, rollout_frames - grad_frames)
        grad_chunks = [k for k in range(chunks) if k * chunk >= grad_start]
        layout = [min(k * chunk, max_frames) for k in range(chunks)]
        views = sum(layout[k] for k in grad_chunks)
        # frames the kept views' layouts reference, plus the last chunk the policy commits: evicted frames
        # stay alive while a kept view still lists them
        union = min(grad_chunks[-1] * chunk, max_frames + (len(grad_chunks) - 1) * chunk) if grad_chunks else 0
        cache_alive = min(chunks * chunk, max(union + chunk, max_frames))
        q_chunk = chunk * tokens_per_frame
        kept, work = grad_forward(student, q_chunk, q_chunk + layout[grad_chunks[-1]] * tokens_per_frame)
        rollout_items = [
            Item(f"KV cache: up to {cache_alive} latent frames ({kv / GIB:.2f} GiB each)", cache_alive * kv, "kv"),
            Item(f"attention views kept for backward ({len(grad_chunks)} grad chunks, {views} frames of rotated K + V)",
                 views * kv, "kv"),
            Item(f"checkpointed block inputs, {len(grad_chunks)} grad chunks x {q_chunk} tokens",
                 len(grad_chunks) * kept, "activations")]
        score_tokens = (context + target) * tokens_per_frame
        guidance = float(cfg.get("guidance", 3.0))
        real, critic = by_name["real_score"].config, by_name["critic"].config
        real_pass = nograd_forward_bytes(real, score_tokens, (2 if guidance else 1) * batch, act)
        fake_pass = nograd_forward_bytes(critic, score_tokens, batch, act)
        real_all = real_pass + sum(i.bytes for i in working("real_score"))
        fake_all = fake_pass + sum(i.bytes for i in working("critic"))
        if real_all >= fake_all:  # one score runs at a time: the larger, with its FSDP2 working buffers
            scoring = [Item(f"real score ({'CFG, batch 2B' if guidance else 'batch B'}) forward over "
                            f"{context + target} frames (no grad)", real_pass, "activations")] + working("real_score")
        else:
            scoring = [Item(f"critic forward over {context + target} frames (no grad)", fake_pass, "activations")
                       ] + working("critic")
        gen_accum = grads("generator", False)
        autocast_cache = [] if counts["generator"].sharded else working("generator")  # one GPU: lives all step
        fsdp_generator = working("generator") if counts["generator"].sharded else []
        commit = Item("commit pass: one chunk's captured K/V and its cached copy", 2 * chunk * kv, "kv")
        rollout_chunk = Item(f"generator forward of one chunk ({q_chunk} tokens, the layer's past K/V)",
                             nograd_forward_bytes(student, q_chunk, batch, act, key_tokens=(max_frames + chunk) * tokens_per_frame),
                             "activations")
        phases.append(Phase("generator rollout", persistent + gen_accum + autocast_cache + fsdp_generator
                            + rollout_items + [max(commit, rollout_chunk, key=lambda i: i.bytes)]))
        phases.append(Phase("generator DMD scoring", persistent + gen_accum + autocast_cache + rollout_items + scoring))
        phases.append(Phase("generator backward", persistent + grads("generator", True) + working("generator", True)
                            + rollout_items + [Item("one block recomputed in backward (+ grad buffers)", work, "activations")]))
        phases.append(Phase("generator optimizer step", persistent + grads("generator", True)[:1] + [
            Item("AdamW foreach temporaries", 8 * counts["generator"].shard_trainable, "state")]))
        # The critic: a gradient-free rollout, then flow matching on the judged window.
        nograd_chunk = nograd_forward_bytes(student, q_chunk, batch, act, key_tokens=max_frames * tokens_per_frame)
        phases.append(Phase("critic rollout (no grad)", persistent + grads("critic", False) + working("generator") + [
            Item(f"KV cache: up to {min(chunks * chunk, max_frames)} latent frames", min(chunks * chunk, max_frames) * kv, "kv"),
            Item("current chunk's attention view", min((chunks - 1) * chunk, max_frames) * kv, "kv"),
            Item(f"generator forward of one chunk ({q_chunk} tokens, no grad)", nograd_chunk, "activations")]))
        kept_c, work_c = grad_forward(critic, score_tokens, score_tokens)
        held = [Item(f"student memory kept for the context ({min(chunks * chunk, max_frames)} frames)",
                     min(chunks * chunk, max_frames) * kv, "kv")] if recipe == "cf-stage2" else []
        if counts["generator"].sharded:  # its gradient-free rollout leaves the FSDP2 root gathered until its next backward
            held.append(Item(f"generator: root weights still gathered after the critic's rollout "
                             f"({'bf16' if mixed_precision else 'fp32'})", counts["generator"].root * act, "fsdp"))
        phases += one_forward("critic", "critic", Item(f"checkpointed block inputs ({context + target} frames)", kept_c,
                                                       "activations"), work_c, extra=held)
        phases.append(Phase("critic optimizer step", persistent + grads("critic", True)[:1] + [
            Item("AdamW foreach temporaries", 8 * counts["critic"].shard_trainable, "state")]))

    models = {}
    for plan in plans:
        c = counts[plan.name]
        label = next((k for k, v in CONFIGS.items() if v == plan.config), f"dim {plan.config.dim}")
        models[plan.name] = {"config": label, "parameters": c.total, "trainable": c.trainable,
                             "role": "trainable" if plan.trainable else "frozen", "sharded": c.sharded,
                             "lora_rank": int(plan.lora.get("rank", 0)) if plan.lora else 0, "ema": plan.ema}
    return Estimate(recipe, world, accumulation, batch, mixed_precision, models, phases, host, assumptions)


# ---- presentation -------------------------------------------------------------------------------------
def format_estimate(est: Estimate) -> str:
    lines = [f"{est.recipe}: {est.world_size} GPU(s) x accumulation {est.accumulation}, batch {est.batch_per_rank} per GPU"
             f" (global {est.batch_per_rank * est.world_size * est.accumulation}), "
             f"{'bf16 mixed precision' if est.mixed_precision else 'fp32'} - COMPUTED, not measured"]
    for name, m in est.models.items():
        lines.append(f"  {name}: {m['config']}, {m['parameters'] / 1e9:.3f} B params, {m['role']}"
                     + (f", LoRA rank {m['lora_rank']} ({m['trainable'] / 1e6:.1f} M trainable)" if m["lora_rank"] else "")
                     + (", sharded" if m["sharded"] else "") + (", EMA" if m["ema"] else ""))
    peak = est.peak
    lines.append("")
    lines.append(f"{'phase':<38} {'GiB':>8}")
    for p in est.phases:
        mark = "  <- peak" if p is peak else ""
        lines.append(f"{p.name:<38} {p.bytes / GIB:>8.2f}{mark}")
    lines.append("")
    lines.append(f"peak phase '{peak.name}':")
    for item in sorted(peak.items, key=lambda i: -i.bytes):
        if item.bytes:
            lines.append(f"  {item.gib:>8.2f} GiB  {item.what}")
    lines.append(f"  {peak.bytes / GIB:>8.2f} GiB  total")
    if est.peak_training is not peak:
        lines.append(f"(once training runs: {est.peak_training.bytes / GIB:.2f} GiB, '{est.peak_training.name}')")
    for item in est.host:
        lines.append(f"host memory: {item.gib:.2f} GiB  {item.what}")
    lines.append("")
    for gpu, verdict in est.verdicts().items():
        lines.append(f"  {gpu:<24} {verdict}")
    return "\n".join(lines)


# ---- the reference set-ups (issue 5: "will it fit?") --------------------------------------------------
#: (recipe, GPUs, gradient accumulation, why this set-up). Batch per GPU: the config's (1 at Wan scale).
REFERENCE_SETUPS = [
    ("self-forcing", 64, 1, "Self-Forcing: batch 64 on 64 GPUs (SPEC §4)"),
    ("cf-teacher", 8, 8, "Context Forcing on 8 GPUs x 8 accumulation (the code's batch 8 is 8 x 1)"),
    ("cf-stage1", 8, 8, "Context Forcing on 8 GPUs x 8 accumulation: batch 64"),
    ("cf-stage2", 8, 8, "Context Forcing on 8 GPUs x 8 accumulation: batch 64"),
    ("teacher", 8, 1, "bidirectional teacher, one node"),
    ("ode-init", 8, 1, "ODE init, one node"),
    ("gf-stage1", 32, 2, "Grounded Forcing: 32 GPUs (paper) x the config's accumulation 2"),
    ("gf-stage2", 32, 2, "Grounded Forcing: 32 GPUs (paper) x the config's accumulation 2"),
]


def reference_estimates(scale: str = "wan1.3b") -> list:
    from .config import load_config

    return [(estimate(load_config(recipe, scale=scale), world, accumulation=accumulation), why)
            for recipe, world, accumulation, why in REFERENCE_SETUPS]


def markdown_table(estimates: list) -> str:
    """The README's table: one row per set-up, the peak phase's three largest parts, a verdict per GPU size."""
    gpus = list(GPUS)
    head = ("| recipe | GPUs x accumulation (global batch) | peak / GPU | peak phase | largest parts | "
            + " | ".join(g.split(" (")[0] for g in gpus) + " |")
    rows = [head, "|" + "---|" * (5 + len(gpus))]
    for est, _ in estimates:
        peak = est.peak_training
        parts = sorted(peak.items, key=lambda i: -i.bytes)[:3]
        verdicts = []
        for gpu in gpus:
            cap = GPUS[gpu]
            need = est.peak.bytes / GIB
            verdicts.append("yes" if need <= 0.95 * cap else "tight" if need <= cap else "**no**")
        setup = est.peak is not peak
        rows.append(f"| `{est.recipe}` | {est.world_size} x {est.accumulation} "
                    f"({est.batch_per_rank * est.world_size * est.accumulation}) | "
                    f"**{peak.bytes / GIB:.1f} GiB**" + (f" (setup {est.peak.bytes / GIB:.1f})" if setup else "")
                    + f" | {peak.name} | " + "; ".join(f"{i.what.split(' (')[0]} {i.gib:.1f}" for i in parts)
                    + " | " + " | ".join(verdicts) + " |")
    return "\n".join(rows)


def _main(argv=None) -> int:
    import argparse
    import json

    p = argparse.ArgumentParser(prog="python -m tether.train.memory_estimate",
                                description="Computed per-GPU memory of the reference training set-ups.")
    p.add_argument("--scale", default="wan1.3b")
    p.add_argument("--out", help="write OUT.json (every set-up, every phase) and OUT.md (tables)")
    args = p.parse_args(argv)
    estimates = reference_estimates(args.scale)
    for est, why in estimates:
        print(f"# {why}")
        print(format_estimate(est))
        print()
    table = markdown_table(estimates)
    print(table)
    if args.out:
        payload = {"computed_not_measured": True, "scale": args.scale,
                   "setups": [{"why": why, **est.to_dict()} for est, why in estimates]}
        Path(f"{args.out}.json").write_text(json.dumps(payload, indent=2) + "\n")
        details = "\n\n".join(f"### {why}\n\n```\n{format_estimate(est)}\n```" for est, why in estimates)
        Path(f"{args.out}.md").write_text(
            f"# Per-GPU memory at Wan scale ({args.scale}): computed, not measured\n\n"
            f"Written by `python -m tether.train.memory_estimate --out {args.out}` (`tether/train/memory_estimate.py`,"
            f" whose docstring lists every assumption). No GPU was used: these are computed estimates.\n"
            f"'peak / GPU' is the largest phase once training runs; 'setup' is the moment a model is whole on the GPU"
            f" before it is sharded (a trainable one in fp32, a frozen one already cast to bf16 on the CPU). Verdicts use the larger of the two against 95 % of the card's usable"
            f" memory ({', '.join(f'{k}: {v} GiB' for k, v in GPUS.items())}).\n\n{table}\n\n{details}\n")
        print(f"wrote {args.out}.json and {args.out}.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
