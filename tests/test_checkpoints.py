"""Every checkpoint layout tether reads, each written here in exactly that layout for the tiny config."""

import json

import pytest
import torch
from safetensors.torch import save_file

from tether.checkpoints import detect_format, diffusers_to_original_key, load_transformer, save_transformer
from tether.configs import CONFIGS
from tether.errors import TetherError
from tether.model import WanTransformer

CFG = CONFIGS["tiny"]


def tiny_model(seed: int) -> WanTransformer:
    torch.manual_seed(seed)
    return WanTransformer(CFG).eval()


def weights_of(model) -> dict:
    return {key: tensor.detach().clone() for key, tensor in model.state_dict().items()}


def assert_same_weights(model, expected: dict):
    got = model.state_dict()
    assert set(got) == set(expected)
    for key, tensor in expected.items():
        assert torch.equal(got[key], tensor), key


@pytest.fixture(scope="module")
def inputs():
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(1, CFG.in_channels, 3, 4, 6, generator=generator)
    text = torch.randn(1, 5, CFG.text_dim, generator=generator)
    return latents, torch.tensor([700.0]), text


@torch.no_grad()
def outputs(model, inputs):
    return model.forward_bidirectional(*inputs)


WAN_CONFIG_JSON = {  # Wan's own config.json, with the tiny sizes
    "_class_name": "WanModel", "_diffusers_version": "0.30.0", "model_type": "t2v", "dim": CFG.dim,
    "ffn_dim": CFG.ffn_dim, "freq_dim": CFG.freq_dim, "in_dim": CFG.in_channels, "out_dim": CFG.out_channels,
    "num_heads": CFG.num_heads, "num_layers": CFG.num_layers, "text_len": CFG.text_len, "eps": CFG.eps,
    "text_dim": CFG.text_dim,
}


# ---- named configs ------------------------------------------------------------


def test_named_config_is_seeded_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = load_transformer("tiny")
    assert torch.equal(torch.get_rng_state(), state)
    assert detect_format("tiny") == "config"
    assert_same_weights(load_transformer("tiny"), weights_of(first))
    half = load_transformer("tiny", dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16
    # Small configs are built in fp32 and cast: bf16 weights are the fp32 ones rounded.
    assert_same_weights(half, {k: v.to(torch.bfloat16) for k, v in first.state_dict().items()})


# ---- original Wan2.1 folder ------------------------------------------------------


def test_wan_folder_single_file(tmp_path, inputs):
    source = tiny_model(1)
    save_file(weights_of(source), tmp_path / "diffusion_pytorch_model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(WAN_CONFIG_JSON))
    assert detect_format(tmp_path) == "wan"
    loaded = load_transformer(tmp_path)
    assert loaded.config == CFG
    assert_same_weights(loaded, weights_of(source))
    assert torch.equal(outputs(loaded, inputs), outputs(source, inputs))


def test_wan_folder_sharded(tmp_path, inputs):
    source = tiny_model(2)
    weights = weights_of(source)
    keys = list(weights)
    shards = {"diffusion_pytorch_model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "diffusion_pytorch_model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    for name, shard_keys in shards.items():
        save_file({k: weights[k] for k in shard_keys}, tmp_path / name)
    index = {"metadata": {"total_size": 0}, "weight_map": {k: name for name, ks in shards.items() for k in ks}}
    (tmp_path / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    (tmp_path / "config.json").write_text(json.dumps(WAN_CONFIG_JSON))
    loaded = load_transformer(tmp_path)
    assert torch.equal(outputs(loaded, inputs), outputs(source, inputs))

    (tmp_path / "diffusion_pytorch_model-00002-of-00002.safetensors").unlink()
    with pytest.raises(TetherError, match="00002-of-00002"):
        load_transformer(tmp_path)


def test_wan_config_json_is_believed_over_named_configs(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**WAN_CONFIG_JSON, "num_heads": 4}))
    save_file(weights_of(tiny_model(3)), tmp_path / "diffusion_pytorch_model.safetensors")
    assert load_transformer(tmp_path).config.num_heads == 4


# ---- diffusers ---------------------------------------------------------------------


def diffusers_tiny():
    from diffusers import WanTransformer3DModel

    torch.manual_seed(4)
    model = WanTransformer3DModel(
        patch_size=CFG.patch_size, num_attention_heads=CFG.num_heads, attention_head_dim=CFG.head_dim,
        in_channels=CFG.in_channels, out_channels=CFG.out_channels, text_dim=CFG.text_dim, freq_dim=CFG.freq_dim,
        ffn_dim=CFG.ffn_dim, num_layers=CFG.num_layers, cross_attn_norm=True, eps=CFG.eps,
    ).eval()
    # diffusers initialises the modulation tables to zero-ish values; make every weight matter.
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return model


def test_diffusers_folder_matches_diffusers_forward(tmp_path, inputs):
    reference = diffusers_tiny()
    reference.save_pretrained(tmp_path / "pipeline" / "transformer")
    (tmp_path / "pipeline" / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline"}))
    latents, timestep, text = inputs
    padded = torch.nn.functional.pad(text, (0, 0, 0, CFG.text_len - text.shape[1]))  # tether pads internally
    with torch.no_grad():
        expected = reference(latents, timestep, padded, return_dict=False)[0]
    for source in (tmp_path / "pipeline", tmp_path / "pipeline" / "transformer"):
        assert detect_format(source) == "diffusers"
        loaded = load_transformer(source)
        assert loaded.config == CFG  # text_len is not in diffusers' config: taken from the matching named config
        assert (outputs(loaded, inputs) - expected).abs().max() <= 1e-5


def test_diffusers_names_round_trip_through_diffusers_converter():
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    original = weights_of(tiny_model(5))
    converted = convert_wan_transformer_to_diffusers(dict(original))
    assert set(converted) != set(original)
    back = {diffusers_to_original_key(key): tensor for key, tensor in converted.items()}
    assert set(back) == set(original)
    assert all(torch.equal(back[key], original[key]) for key in original)


# ---- Self-Forcing / CausVid .pt --------------------------------------------------------


def training_checkpoint(generator: dict, ema: dict = None, prefix="model.") -> dict:
    contents = {"generator": {prefix + k: v for k, v in generator.items()}}
    if ema is not None:
        contents["generator_ema"] = {prefix + k: v for k, v in ema.items()}
    contents["critic"] = {prefix + k: torch.zeros_like(v) for k, v in generator.items()}
    return contents


def test_self_forcing_pt_selects_generator_or_ema(tmp_path, inputs):
    plain, averaged = weights_of(tiny_model(6)), weights_of(tiny_model(7))
    path = tmp_path / "self_forcing_dmd.pt"
    torch.save(training_checkpoint(plain, averaged), path)
    assert detect_format(path) == "self-forcing"
    loaded = load_transformer(path)
    assert loaded.config == CFG  # inferred from shapes, matched to the named config
    assert_same_weights(loaded, plain)
    assert_same_weights(load_transformer(path, ema=True), averaged)
    assert_same_weights(load_transformer(path, ema=True, config="tiny", dtype=torch.float64),
                        {k: v.double() for k, v in averaged.items()})

    torch.save(training_checkpoint(plain), tmp_path / "no_ema.pt")
    with pytest.raises(TetherError, match="generator_ema"):
        load_transformer(tmp_path / "no_ema.pt", ema=True)


def test_shape_inference_without_a_named_match_needs_wan_head_size(tmp_path):
    odd = WanTransformer(CFG.__class__(**{**CFG.to_dict(), "dim": 96, "num_heads": 3, "patch_size": (1, 2, 2)}))
    torch.save(training_checkpoint(weights_of(odd)), tmp_path / "odd.pt")
    with pytest.raises(TetherError, match="config="):
        load_transformer(tmp_path / "odd.pt")
    assert load_transformer(tmp_path / "odd.pt", config=odd.config).config.dim == 96


# ---- plain safetensors files ---------------------------------------------------------------


def test_plain_safetensors_with_comfy_prefix_or_diffusers_names(tmp_path, inputs):
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    source = tiny_model(15)
    save_file({"model.diffusion_model." + k: v for k, v in weights_of(source).items()}, tmp_path / "comfy.safetensors")
    save_file(convert_wan_transformer_to_diffusers(weights_of(source)), tmp_path / "diffusers.safetensors")
    for name in ("comfy.safetensors", "diffusers.safetensors"):
        assert detect_format(tmp_path / name) == "safetensors"
        loaded = load_transformer(tmp_path / name)
        assert torch.equal(outputs(loaded, inputs), outputs(source, inputs))


# ---- LongLive base + LoRA -------------------------------------------------------------


def fsdp_name(key: str) -> str:
    """How FSDP1 + the training wrapper spell a name when the state dict is saved raw."""
    parts = key.split(".")
    if parts[0] == "blocks":
        parts.insert(2, "_fsdp_wrapped_module")
    return "model._fsdp_wrapped_module." + ".".join(parts)


def peft_lora(base: dict, rank=4, alpha=8):
    """A PEFT LoRA on the self-attention linears of a tiny model, with non-zero B."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    model = WanTransformer(CFG).eval()
    model.load_state_dict(base)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=["self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o"])
    peft_model = get_peft_model(model, config)
    torch.manual_seed(8)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_" in name:
                parameter.copy_(0.1 * torch.randn_like(parameter))
    return peft_model, get_peft_model_state_dict(peft_model)


def test_longlive_base_plus_lora(tmp_path, inputs):
    base = weights_of(tiny_model(9))
    peft_model, lora_state = peft_lora(base, rank=4, alpha=8)
    assert any(key.startswith("base_model.model.blocks.0.self_attn.q.lora_A") for key in lora_state)

    folder = tmp_path / "longlive"
    folder.mkdir()
    torch.save({"generator": {fsdp_name(k): v for k, v in base.items()}}, folder / "longlive_base.pt")
    fsdp_lora = {k.replace("base_model.model.", "base_model.model._fsdp_wrapped_module."): v for k, v in lora_state.items()}
    torch.save({"generator_lora": fsdp_lora, "critic_lora": {}}, folder / "lora.pt")
    assert detect_format(folder) == "longlive"
    assert detect_format(folder / "lora.pt") == "lora"

    merged = load_transformer(folder, lora_alpha=8)
    scale = 8 / 4
    expected = dict(base)
    for target in ("q", "k", "v", "o"):
        for block in range(CFG.num_layers):
            module = f"blocks.{block}.self_attn.{target}"
            down = lora_state[f"base_model.model.{module}.lora_A.weight"]
            up = lora_state[f"base_model.model.{module}.lora_B.weight"]
            expected[f"{module}.weight"] = base[f"{module}.weight"] + scale * up @ down
    for key, tensor in merged.state_dict().items():
        torch.testing.assert_close(tensor, expected[key], rtol=0, atol=1e-6)

    # The merged model computes what PEFT's unmerged LoRA forward computes.
    with torch.no_grad():
        reference = peft_model.base_model.model.forward_bidirectional(*inputs)
    assert (outputs(merged, inputs) - reference).abs().max() <= 1e-5

    # The base file with lora= is the same thing; without lora_alpha, alpha = rank (scale 1).
    same = load_transformer(folder / "longlive_base.pt", lora=folder / "lora.pt", lora_alpha=8)
    assert_same_weights(same, weights_of(merged))
    # A PEFT adapter folder records alpha in adapter_config.json.
    peft_model.save_pretrained(tmp_path / "adapter")
    assert detect_format(tmp_path / "adapter") == "lora"
    from_adapter = load_transformer(folder / "longlive_base.pt", lora=tmp_path / "adapter")
    assert_same_weights(from_adapter, weights_of(merged))

    unit_scale = load_transformer(folder / "longlive_base.pt", lora=folder / "lora.pt")
    module = "blocks.1.self_attn.v"
    delta = lora_state[f"base_model.model.{module}.lora_B.weight"] @ lora_state[f"base_model.model.{module}.lora_A.weight"]
    torch.testing.assert_close(unit_scale.state_dict()[f"{module}.weight"], base[f"{module}.weight"] + delta, rtol=0, atol=1e-6)


def test_lora_with_adapter_names_and_top_level_base(tmp_path):
    base = weights_of(tiny_model(10))
    _, lora_state = peft_lora(base, rank=2, alpha=2)
    torch.save({fsdp_name(k): v for k, v in base.items()}, tmp_path / "base.pt")  # no generator nesting
    named = {k.replace(".weight", ".default.weight"): v for k, v in lora_state.items()}
    torch.save(named, tmp_path / "lora.pt")
    merged = load_transformer(tmp_path / "base.pt", lora=tmp_path / "lora.pt")
    module = "blocks.0.self_attn.q"
    delta = lora_state[f"base_model.model.{module}.lora_B.weight"] @ lora_state[f"base_model.model.{module}.lora_A.weight"]
    torch.testing.assert_close(merged.state_dict()[f"{module}.weight"], base[f"{module}.weight"] + delta, rtol=0, atol=1e-6)


def test_lora_that_does_not_fit_is_an_error(tmp_path):
    base = weights_of(tiny_model(11))
    torch.save({"generator": {"model." + k: v for k, v in base.items()}}, tmp_path / "base.pt")
    torch.save({"blocks.0.self_attn.nope.lora_A.weight": torch.zeros(2, 64),
                "blocks.0.self_attn.nope.lora_B.weight": torch.zeros(64, 2)}, tmp_path / "lora.pt")
    with pytest.raises(TetherError, match="blocks.0.self_attn.nope.weight"):
        load_transformer(tmp_path / "base.pt", lora=tmp_path / "lora.pt")
    with pytest.raises(TetherError, match="LoRA"):
        load_transformer(tmp_path / "lora.pt")


# ---- tether's own format ----------------------------------------------------------------


def test_tether_safetensors_round_trip(tmp_path, inputs):
    source = tiny_model(12)
    path = tmp_path / "out" / "transformer.safetensors"
    save_transformer(source, path)
    assert detect_format(path) == "tether"
    loaded = load_transformer(path)
    assert loaded.config == CFG
    assert_same_weights(loaded, weights_of(source))
    assert torch.equal(outputs(loaded, inputs), outputs(source, inputs))
    assert [p.name for p in path.parent.iterdir()] == ["transformer.safetensors"]  # no temp file left

    save_transformer(source, path, dtype=torch.bfloat16)
    assert load_transformer(path).dtype == torch.bfloat16
    assert load_transformer(path, dtype=torch.float32).dtype == torch.float32

    # A non-named config survives the round trip through the metadata.
    custom = WanTransformer(CFG.__class__(**{**CFG.to_dict(), "text_len": 8, "patch_size": (1, 2, 2)}))
    save_transformer(custom, tmp_path / "custom.safetensors")
    assert load_transformer(tmp_path / "custom.safetensors").config == custom.config


class Opaque:
    """Something that is not a tensor: torch.load(weights_only=True) must refuse it."""


# ---- wrong checkpoints -------------------------------------------------------------------


def test_mismatches_are_named_in_one_error(tmp_path):
    weights = weights_of(tiny_model(13))
    del weights["blocks.1.ffn.2.bias"]
    weights["blocks.0.self_attn.extra.weight"] = torch.zeros(3)
    weights["head.head.bias"] = torch.zeros(15)
    torch.save({"generator": {"model." + k: v for k, v in weights.items()}}, tmp_path / "broken.pt")
    with pytest.raises(TetherError) as caught:
        load_transformer(tmp_path / "broken.pt")
    message = str(caught.value)
    assert "broken.pt does not fit config tiny" in message
    assert "1 missing (blocks.1.ffn.2.bias)" in message
    assert "1 unexpected (model.blocks.0.self_attn.extra.weight)" in message  # named as in the file
    assert "1 shape mismatches (head.head.bias: checkpoint [15] vs model [16])" in message


def test_shape_mismatch_against_a_stated_config(tmp_path):
    weights = weights_of(tiny_model(14))
    weights["patch_embedding.weight"] = torch.zeros(64, 5, 1, 2, 2)
    save_file(weights, tmp_path / "diffusion_pytorch_model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(WAN_CONFIG_JSON))
    with pytest.raises(TetherError, match=r"patch_embedding.weight: checkpoint \[64, 5, 1, 2, 2\] vs model \[64, 4, 1, 2, 2\]"):
        load_transformer(tmp_path)


def test_unreadable_sources(tmp_path):
    with pytest.raises(TetherError, match="not found"):
        load_transformer(tmp_path / "nowhere.pt")
    with pytest.raises(TetherError):
        detect_format(tmp_path / "nowhere")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(TetherError, match="not a checkpoint"):
        load_transformer(tmp_path / "notes.txt")
    (tmp_path / "garbage.pt").write_bytes(b"not a zip")
    with pytest.raises(TetherError, match="cannot read"):
        load_transformer(tmp_path / "garbage.pt")
    torch.save({"generator": {"model.x": torch.zeros(1)}, "config": Opaque()}, tmp_path / "pickle.pt")
    with pytest.raises(TetherError, match="weights_only"):
        load_transformer(tmp_path / "pickle.pt")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(TetherError, match="no transformer checkpoint"):
        load_transformer(empty)
    save_transformer(tiny_model(0), tmp_path / "t.safetensors")
    with pytest.raises(TetherError, match="EMA"):
        load_transformer(tmp_path / "t.safetensors", ema=True)
