"""LoRA students: DMD generators train adapters only, export them, continue them, and ship as adapter bundles."""

import json
import os
import subprocess
import sys

import pytest
import torch

from tether.checkpoints import BASE_FINGERPRINT_KEY, load_transformer, save_transformer, weights_fingerprint
from tether.errors import TetherError
from tether.pipeline import BUILTIN, load_pipeline
from tether.train import Trainer
from tether.train.config import load_config
from tether.train.lora import add_lora, merge_lora, save_adapter

TINY = ["data.frames=6", "data.height=4", "data.width=4", "batch_size=2", "ema=0.9", "generator_every=1"]


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    path = tmp_path_factory.mktemp("base") / "base.safetensors"
    save_transformer(load_transformer("tiny"), path)
    return path


def _trainer(recipe, run_dir, base, *extra):
    cfg = load_config(recipe, overrides=[f"model.source={base}"] + TINY + ["lora={rank: 4, alpha: 8}"] + list(extra))
    return Trainer(cfg, run_dir, progress=False)


def test_a_lora_generator_trains_only_its_adapters_and_exports_them(tmp_path, tiny_base):
    trainer = _trainer("gf-stage1", tmp_path / "run", tiny_base, "steps=2")
    trainer.run()
    generator = trainer.models["generator"]
    trainable = [n for n, p in generator.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    base = load_transformer(str(tiny_base)).state_dict()
    for name, param in generator.named_parameters():
        if not param.requires_grad:
            assert torch.equal(param, base[name.replace(".base_layer.", ".")])
    trainer.recipe.export(tmp_path / "export")
    merged = load_transformer(str(tmp_path / "export" / "transformer.safetensors")).state_dict()
    # The adapter alone, merged into the untouched base, gives the exported weights (fp16 factors aside).
    rebuilt = load_transformer(str(tiny_base), lora=str(tmp_path / "export" / "adapter")).state_dict()
    moved = [k for k in merged if not torch.equal(merged[k], base[k])]
    assert moved and all(".self_attn." in k or ".cross_attn." in k for k in moved)
    for key in merged:
        torch.testing.assert_close(rebuilt[key], merged[key], atol=2e-4, rtol=1e-3)


def test_a_later_stage_continues_the_earlier_adapter(tmp_path, tiny_base):
    first = _trainer("gf-stage1", tmp_path / "one", tiny_base, "steps=1")
    first.run()
    first.recipe.export(tmp_path / "one" / "export")
    adapter = tmp_path / "one" / "export" / "adapter"
    second = _trainer("gf-stage2", tmp_path / "two", tiny_base, "steps=0", f"lora.init={adapter}")
    second.run()  # sets the recipe up without a step
    saved = load_transformer(str(tiny_base), lora=str(adapter)).state_dict()
    weights = merge_lora({k: v.detach() for k, v in second.models["generator"].state_dict().items()}, 8 / 4)
    for key in saved:
        torch.testing.assert_close(weights[key], saved[key], atol=1e-5, rtol=1e-5)
    other_rank = ["lora={rank: 2, alpha: 8}", f"lora.init={adapter}"]
    third = Trainer(load_config("gf-stage2", overrides=[f"model.source={tiny_base}"] + TINY + other_rank),
                    tmp_path / "three", progress=False)
    with pytest.raises(TetherError, match=r"the LoRA wants \[2, 64\]"):
        third.run()


def test_an_adapter_bundle_loads_over_its_base_bundle(tmp_path):
    model = add_lora(load_transformer(str(BUILTIN / "transformer.safetensors"), dtype=torch.float32), {"rank": 2, "alpha": 2})
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_B." in name:
                param.copy_(0.01 * torch.randn(param.shape, generator=generator))
    weights = model.state_dict()
    bundle = tmp_path / "bundle"
    save_adapter(weights, {"rank": 2, "alpha": 2}, bundle / "adapter", dtype=torch.float32)
    meta = {"base": os.path.relpath(BUILTIN, bundle), "lora": "adapter", "height": 64, "width": 64, "fps": 16,
            "description": "test adapter"}
    (bundle / "pipeline.json").write_text(json.dumps(meta))
    pipe = load_pipeline(str(bundle))
    expected = merge_lora(weights, 1.0)
    for key, value in pipe.model.state_dict().items():
        torch.testing.assert_close(value, expected[key], atol=1e-4, rtol=2e-3)  # the merge rounds to the file's fp16
    assert pipe.description == "test adapter" and pipe.height == 64 and pipe.policy == "window"
    # A student bundle names the policy it was trained with, and generate runs it unless told otherwise.
    meta["policy"] = "slow-fast"
    (bundle / "pipeline.json").write_text(json.dumps(meta))
    run = subprocess.run([sys.executable, "-m", "tether", "generate", "--checkpoint", str(bundle), "--prompt", "a red circle",
                          "--seconds", "1", "--quiet", "-o", str(tmp_path / "v.mp4")], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "policy slow-fast" in run.stdout
    meta["base"] = "no-such-bundle"
    (bundle / "pipeline.json").write_text(json.dumps(meta))
    with pytest.raises(TetherError, match="not a tether bundle"):
        load_pipeline(str(bundle))


def test_weights_fingerprint_follows_the_weights_not_the_file(tmp_path, tiny_base):
    copy = tmp_path / "copy.safetensors"
    copy.write_bytes(tiny_base.read_bytes())
    assert weights_fingerprint(copy) == weights_fingerprint(tiny_base)
    changed = bytearray(tiny_base.read_bytes())
    changed[-3] ^= 1  # one bit of the last tensor
    copy.write_bytes(bytes(changed))
    assert weights_fingerprint(copy) != weights_fingerprint(tiny_base)


def test_an_adapter_over_other_base_weights_is_refused(tmp_path, tiny_base):
    model = add_lora(load_transformer(str(tiny_base), dtype=torch.float32), {"rank": 2, "alpha": 2})
    adapter = tmp_path / "adapter"
    save_adapter(model.state_dict(), {"rank": 2, "alpha": 2}, adapter, dtype=torch.float32)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, BASE_FINGERPRINT_KEY: weights_fingerprint(tiny_base)}))
    load_transformer(str(tiny_base), lora=str(adapter))  # the base it was made over
    other = tmp_path / "other.safetensors"
    save_transformer(load_transformer("tiny"), other)
    torch.manual_seed(1)
    retrained = load_transformer(str(other))
    with torch.no_grad():
        for param in retrained.parameters():
            param.add_(0.01 * torch.randn_like(param))
    save_transformer(retrained, other)
    with pytest.raises(TetherError, match="made over other base weights"):
        load_transformer(str(other), lora=str(adapter))


@pytest.mark.parametrize("name, policy", [("context-forcing", "slow-fast"), ("grounded-forcing", "dual")])
def test_shipped_students_are_adapters_over_the_default(name, policy):
    from tether.pipeline import WEIGHTS

    meta = json.loads((WEIGHTS / name / "pipeline.json").read_text())
    assert meta["base"] == "../default"
    adapter_config = json.loads((WEIGHTS / name / "adapter" / "adapter_config.json").read_text())
    assert adapter_config[BASE_FINGERPRINT_KEY] == weights_fingerprint(WEIGHTS / "default" / "transformer.safetensors")
    student, default = load_pipeline(name), load_pipeline()
    assert student.policy == policy and default.policy == "window"
    # An adapter samples as its base does: the same shift, the same teacher grid.
    assert student.shift == default.shift and student.teacher_sampling == default.teacher_sampling
    moved = [k for k, v in default.model.state_dict().items() if not torch.equal(v, student.model.state_dict()[k])]
    assert moved and all("attn." in k for k in moved)


def test_shipped_weights_fit_the_50_mb_budget():
    from tether.pipeline import WEIGHTS

    total = sum(f.stat().st_size for f in WEIGHTS.rglob("*") if f.is_file())
    assert total <= 50e6, f"tether/weights holds {total / 1e6:.1f} MB"
