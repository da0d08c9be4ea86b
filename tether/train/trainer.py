"""The one trainer behind every recipe, from the toy world to Wan-scale clusters.

- Distribution: `torchrun` sets RANK/WORLD_SIZE; models are sharded with
  FSDP2 (`fully_shard`, one unit per transformer block plus the root), on
  gloo for CPU and NCCL for GPU. bf16 mixed precision on GPU.
- Gradient accumulation, gradient clipping, EMA, activation checkpointing.
- Checkpoints hold full (unsharded) state, written by rank 0 to a temporary
  file and renamed, so a kill never leaves a torn file. Every random draw a
  recipe makes comes from `generator(step, ...)`, so a resumed run continues
  exactly where the interrupted one stopped.
- Logging: one JSON line per step in `log.jsonl`, a progress bar, and
  TensorBoard when asked for and installed.
"""

import json
import math
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

from ..errors import TetherError
from .recipe import RECIPES

CHECKPOINT = "checkpoint.pt"


def _seed_of(*parts) -> int:
    """A stable 63-bit seed from integers and strings (Python's hash() is salted per process)."""
    value = 1469598103934665603
    for part in parts:
        for byte in str(part).encode():
            value = ((value ^ byte) * 1099511628211) % (1 << 63)
    return value


class EMA:
    """Exponential moving average of a module's parameters, kept in fp32 on each rank's own shard."""

    def __init__(self, module, decay: float, start_step: int = 0):
        self.decay = decay
        self.start_step = start_step
        self.shadow = {n: p.detach().float().clone() for n, p in module.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, module, step: int) -> None:
        decay = 0.0 if step < self.start_step else self.decay  # before the start, track the weights
        for n, p in module.named_parameters():
            if n in self.shadow:
                self.shadow[n].lerp_(p.detach().float(), 1 - decay)

    def state_dict(self) -> dict:
        return {n: _full(t) for n, t in self.shadow.items()}

    def load_state_dict(self, state: dict, module) -> None:
        params = dict(module.named_parameters())
        for n in self.shadow:
            self.shadow[n].copy_(_local_like(state[n], params[n]))


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _local_like(full, param):
    """The shard of a full tensor that this rank holds for a (possibly sharded) parameter."""
    if hasattr(param, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(full.to(param.device, torch.float32), param.device_mesh, param.placements).to_local()
    return full


class Trainer:
    def __init__(self, cfg: dict, out_dir, resume: bool = False, progress: bool = True):
        self.cfg = cfg
        self.out_dir = Path(out_dir)
        self.resume = resume
        self.progress = progress
        self.total_steps = int(cfg.get("steps", 1))
        self.accumulation = int(cfg.get("accumulation", 1))
        self.seed = int(cfg.get("seed", 0))
        self.save_every = int(cfg.get("save_every", 100))
        self.clip = cfg.get("clip_grad")
        self.activation_checkpointing = bool(cfg.get("activation_checkpointing", False))
        self._init_distributed()
        self.models, self.optimizers, self.schedulers, self.emas = {}, {}, {}, {}
        self.extra_states = {}
        self.sharded = set()
        if cfg.get("recipe") not in RECIPES:
            raise TetherError(f"unknown recipe '{cfg.get('recipe')}' (known: {', '.join(sorted(RECIPES))})")
        self.recipe = RECIPES[cfg["recipe"]](cfg, self)

    # ---- distribution ----------------------------------------------------
    def _init_distributed(self):
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        wanted = self.cfg.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
        if wanted.startswith("cuda"):
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local)
            self.device = torch.device("cuda", local)
        else:
            self.device = torch.device("cpu")
        if self.world_size > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        self.mixed_precision = self.device.type == "cuda" and self.cfg.get("mixed_precision", "bf16") == "bf16"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def close(self) -> None:
        """Leave the process group together. A rank that exits with gloo's threads still running can
        abort ("terminate called without an active exception"), failing a run that finished."""
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()

    def generator(self, step: int, *purpose) -> torch.Generator:
        """Randomness for one step and purpose on this rank, identical on a resumed run."""
        return torch.Generator().manual_seed(_seed_of(self.seed, step, self.rank, *purpose))

    def shared_generator(self, step: int, *purpose) -> torch.Generator:
        """Randomness that every rank draws alike (e.g. Self-Forcing's exit step)."""
        return torch.Generator().manual_seed(_seed_of(self.seed, step, "shared", *purpose))

    def my_share(self, tensor: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a batch drawn for all ranks at once.

        Drawing the global batch from a shared generator and slicing it makes
        N ranks with batch b compute exactly what one rank with batch N*b does.
        """
        per_rank = tensor.shape[0] // self.world_size
        return tensor[self.rank * per_rank:(self.rank + 1) * per_rank].to(self.device)

    # ---- what recipes register -------------------------------------------
    def add_model(self, name: str, module, trainable: bool = True, ema: float | None = None, ema_start: int = 0):
        """Move, shard and register a model; returns the module to use."""
        if not trainable:
            module.requires_grad_(False).eval()
            if self.mixed_precision:
                module.to(torch.bfloat16)  # cast before the move: a 14B score's fp32 copy would not fit on the GPU
        module = module.to(self.device)
        if self.activation_checkpointing and hasattr(module, "gradient_checkpointing"):
            module.gradient_checkpointing = trainable
        if not trainable:
            if self.world_size > 1:
                # Frozen scores are sharded too: whole, a 14B real score is 26.6 GiB on every GPU;
                # sharded, each block is gathered only while it runs.
                module = self._shard(module)
        elif self.world_size > 1:
            module = self._shard(module)
            self.sharded.add(name)
        elif self.mixed_precision:
            pass  # single GPU: autocast in the recipe's forward keeps fp32 master weights
        self.models[name] = module
        if trainable and ema is not None:
            self.emas[name] = EMA(module, ema, ema_start)
        return module

    def _shard(self, module):
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

        kwargs = {}
        if self.mixed_precision:
            kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for block in getattr(module, "blocks", []):
            fully_shard(block, **kwargs)
        fully_shard(module, **kwargs)
        # The root unshards its own parameters in forward hooks; our models are entered
        # through named methods, which need the same hooks.
        for method in ("forward_bidirectional", "forward_block_causal", "forward_masked", "forward_cached", "encode_text"):
            if hasattr(module, method):
                register_fsdp_forward_method(module, method)
        return module

    def add_state(self, name: str, obj):
        """Checkpoint any object with `state_dict`/`load_state_dict` (e.g. an error bank) along with the models.

        Its state must be the same on every rank: rank 0's copy is saved and every rank loads it.
        """
        self.extra_states[name] = obj
        return obj

    def add_optimizer(self, name: str, module, lr: float, betas=(0.9, 0.999), weight_decay: float = 0.0,
                      schedule: str = "constant", final_lr_ratio: float = 1.0, warmup: int = 0, horizon: int | None = None):
        """`horizon`: how many times this optimiser will step (default: the run's steps); the cosine spans it."""
        params = [p for p in module.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay)
        total = max(1, int(horizon) if horizon else self.total_steps)

        def factor(step):
            warm = min(1.0, (step + 1) / warmup) if warmup else 1.0
            if schedule == "cosine":
                progress = min(1.0, step / total)
                return warm * (final_lr_ratio + (1 - final_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
            return warm

        self.optimizers[name] = opt
        self.schedulers[name] = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        self._optimizer_model = getattr(self, "_optimizer_model", {})
        self._optimizer_model[name] = module
        return opt

    def add_optimizer_from_config(self, name: str, module, opt: dict, default_lr: float):
        """`add_optimizer` from a recipe config's optimizer section (lr, betas, weight_decay, schedule, ...)."""
        return self.add_optimizer(name, module, lr=float(opt.get("lr", default_lr)), betas=opt.get("betas", (0.9, 0.999)),
                                  weight_decay=float(opt.get("weight_decay", 0.0)), schedule=opt.get("schedule", "constant"),
                                  final_lr_ratio=float(opt.get("final_lr_ratio", 1.0)), warmup=int(opt.get("warmup", 0)),
                                  horizon=opt.get("horizon"))

    # ---- a step ------------------------------------------------------------
    def backward(self, loss, module, micro: int) -> None:
        """Backward of one micro-batch; gradients sync across ranks only on the last one."""
        last = micro == self.accumulation - 1
        if hasattr(module, "set_requires_gradient_sync"):
            module.set_requires_gradient_sync(last)
        (loss / self.accumulation).backward()

    def optimizer_step(self, name: str, step: int) -> float:
        """Clip, step, schedule, zero, update EMA. Returns the gradient norm."""
        opt = self.optimizers[name]
        module = self._optimizer_model[name]
        params = [p for p in module.parameters() if p.requires_grad]
        norm = torch.nn.utils.clip_grad_norm_(params, self.clip if self.clip else float("inf"))
        norm = float(_full(norm))
        opt.step()
        self.schedulers[name].step()
        opt.zero_grad(set_to_none=True)
        for model_name, m in self.models.items():
            if m is module and model_name in self.emas:
                self.emas[model_name].update(m, step)
        return norm

    def autocast(self):
        if self.device.type == "cuda" and self.mixed_precision:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return torch.autocast("cpu", enabled=False)

    def all_reduce_mean(self, value: float) -> float:
        if self.world_size == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.item() / self.world_size

    # ---- checkpoints -------------------------------------------------------
    def _checkpoint_path(self) -> Path:
        return self.out_dir / CHECKPOINT

    def state(self, step: int) -> dict:
        full = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = {"step": step, "config": self.cfg, "models": {}, "optimizers": {}, "schedulers": {}, "emas": {}}
        for name, m in self.models.items():
            state["models"][name] = get_model_state_dict(m, options=full)
        for name, opt in self.optimizers.items():
            state["optimizers"][name] = get_optimizer_state_dict(self._optimizer_model[name], opt, options=full)
            state["schedulers"][name] = self.schedulers[name].state_dict()
        for name, ema in self.emas.items():
            state["emas"][name] = {k: v.cpu() for k, v in ema.state_dict().items()}
        state["extra"] = {name: obj.state_dict() for name, obj in self.extra_states.items()}
        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        # Plain types and tensors only, so the checkpoint loads with weights_only=True.
        state["rng"] = {"torch": torch.get_rng_state(), "python": random.getstate(),
                        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)]}
        return state

    def save(self, step: int) -> None:
        state = self.state(step)  # every rank takes part in gathering
        if self.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            tmp = self._checkpoint_path().with_suffix(".tmp")
            torch.save(state, tmp)
            os.replace(tmp, self._checkpoint_path())
        if self.world_size > 1:
            dist.barrier()

    def load(self) -> int:
        path = self._checkpoint_path()
        if not path.exists():
            return 0
        state = torch.load(path, map_location="cpu", weights_only=True)
        full = StateDictOptions(full_state_dict=True, broadcast_from_rank0=False)
        for name, m in self.models.items():
            set_model_state_dict(m, state["models"][name], options=full)
        for name, opt in self.optimizers.items():
            set_optimizer_state_dict(self._optimizer_model[name], opt, state["optimizers"][name], options=full)
            self.schedulers[name].load_state_dict(state["schedulers"][name])
        for name, ema in self.emas.items():
            ema.load_state_dict(state["emas"][name], self.models[name])
        for name, obj in self.extra_states.items():
            obj.load_state_dict(state["extra"][name])
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        kind, keys, pos, has_gauss, gauss = state["rng"]["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
        return int(state["step"])

    # ---- the loop ----------------------------------------------------------
    def run(self) -> dict:
        from tqdm import tqdm

        torch.manual_seed(self.seed)
        self.recipe.setup()
        start = self.load() if self.resume else 0
        if not self.resume and self._checkpoint_path().exists():
            raise TetherError(f"{self.out_dir} already holds a run: pass --resume to continue it, or choose another --out")
        if self.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "config.json").write_text(json.dumps(self.cfg, indent=2))
        log_file = open(self.out_dir / "log.jsonl", "a") if self.is_main else None
        bar = tqdm(total=self.total_steps, initial=start, unit="step", desc=self.cfg["recipe"],
                   disable=not (self.progress and self.is_main))
        last = {}
        try:
            for step in range(start, self.total_steps):
                began = time.perf_counter()
                last = {k: self.all_reduce_mean(float(v)) for k, v in self.recipe.step(step).items()}
                seconds = time.perf_counter() - began
                if log_file:
                    log_file.write(json.dumps({"step": step, **last, "seconds": round(seconds, 4)}) + "\n")
                    log_file.flush()
                bar.set_postfix({k: f"{v:.4g}" for k, v in list(last.items())[:3]} | {"s/step": f"{seconds:.2f}"}, refresh=False)
                bar.update(1)
                if (step + 1) % self.save_every == 0 or step + 1 == self.total_steps:
                    self.save(step + 1)
        finally:
            bar.close()
            if log_file:
                log_file.close()
        return last

    # ---- export ------------------------------------------------------------
    def weights(self, name: str, ema: bool = False) -> dict:
        """Full weights of a model, on CPU; with `ema`, its EMA's values for the parameters the EMA keeps
        (the trained ones: a LoRA's adapters, a decoder fine-tune's decoder) and the live rest.

        Every rank takes part in gathering; only rank 0 receives.
        """
        weights = get_model_state_dict(self.models[name], options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if ema and name in self.emas:
            weights.update(self.emas[name].state_dict())
        return weights
