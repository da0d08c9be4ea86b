"""LoRA for training: inject adapters with peft, merge them into plain weights, save them as an adapter.

A recipe config's `lora: {rank, alpha, target_modules, dropout}` trains only
low-rank factors on top of a frozen `model.source`, as LongLive's generator
and Context Forcing's teacher do. The saved adapter folder is what
`tether.checkpoints.load_transformer(base, lora=FOLDER)` merges back, which
is how the toy Context/Grounded Forcing students ship in a few MB each.
"""

import json
from pathlib import Path

import torch

DEFAULT_TARGETS = ("q", "k", "v", "o")
_A, _B = ".lora_A.default.weight", ".lora_B.default.weight"


def add_lora(model, lora_cfg: dict):
    """Inject LoRA adapters (peft) into `target_modules` (default: attention q, k, v, o); only they stay trainable."""
    from peft import LoraConfig, inject_adapter_in_model

    rank = int(lora_cfg.get("rank", 128))
    config = LoraConfig(r=rank, lora_alpha=float(lora_cfg.get("alpha", rank)),
                        target_modules=list(lora_cfg.get("target_modules", DEFAULT_TARGETS)),
                        lora_dropout=float(lora_cfg.get("dropout", 0.0)))
    return inject_adapter_in_model(config, model)


def lora_scale(lora_cfg: dict) -> float:
    rank = int(lora_cfg.get("rank", 128))
    return float(lora_cfg.get("alpha", rank)) / rank


def merge_lora(weights: dict, scale: float) -> dict:
    """Plain transformer weights from a LoRA-injected model's: W = W_base + scale * B @ A."""
    merged = {k.replace(".base_layer.", "."): v for k, v in weights.items() if ".lora_" not in k}
    for key in weights:
        if key.endswith(_A):
            prefix = key[: -len(_A)]
            down, up = weights[key], weights[prefix + _B]
            base = merged[prefix + ".weight"]
            merged[prefix + ".weight"] = base + scale * (up.float() @ down.float()).to(base.dtype)
    return merged


def save_adapter(weights: dict, lora_cfg: dict, folder, dtype=torch.float16) -> Path:
    """The LoRA factors of a LoRA-injected model's weights as a PEFT adapter folder; returns the folder."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    factors = {"base_model.model." + k.replace(".default.weight", ".weight"): v.detach().to(dtype).contiguous()
               for k, v in weights.items() if k.endswith(_A) or k.endswith(_B)}
    if not factors:
        raise ValueError("no LoRA factors in these weights: was the model injected with add_lora?")
    rank = int(lora_cfg.get("rank", 128))
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": float(lora_cfg.get("alpha", rank)),
              "target_modules": list(lora_cfg.get("target_modules", DEFAULT_TARGETS)), "use_rslora": False}
    save_file(factors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=1) + "\n")
    return folder


def load_adapter_into(model, folder) -> None:
    """Continue training from a saved adapter: copy its factors into a model injected with the same LoRA."""
    from ..checkpoints import _read_lora
    from ..errors import TetherError

    saved = {}
    for weight, (down, up) in _read_lora(Path(folder)).factors.items():
        module = weight[: -len(".weight")]
        saved[module + _A], saved[module + _B] = down, up
    params = {n: p for n, p in model.named_parameters() if ".lora_" in n}
    missing, unexpected = sorted(set(params) - set(saved)), sorted(set(saved) - set(params))
    if missing or unexpected:
        raise TetherError(f"adapter {folder} does not fit this LoRA: missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
                          f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''} (same rank and targets?)")
    with torch.no_grad():
        for name, param in params.items():
            if saved[name].shape != param.shape:
                raise TetherError(f"adapter {folder}: {name} is {list(saved[name].shape)}, the LoRA wants {list(param.shape)}")
            param.copy_(saved[name])
