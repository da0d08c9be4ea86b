import math

import pytest
import torch
from transformers import T5Tokenizer, UMT5Config, UMT5EncoderModel

from tether.errors import TetherError
from tether.text import (
    WAN_T5_CHECKPOINT,
    PretrainedTokenizer,
    TextEncoder,
    WordTokenizer,
    load_text_encoder,
    load_wan_t5_checkpoint,
    make_toy_text_encoder,
    save_toy_text_encoder,
    transformers_key_to_wan,
    umt5_config_from_wan_state_dict,
    wan_key_to_transformers,
)

WORDS = "a the red blue green striped dotted circle square triangle bounces rolls on grass sand".split()
TINY_LAYERS, TINY_HEADS = 2, 4
# Wan runs the encoder over all text_len positions; tether stops at the longest
# prompt. Padded keys get zero attention either way, so only the float summation
# order differs.
SHORTER_PADDING_TOLERANCE = 1e-5


def tiny_umt5(vocab_size=40, seed=0):
    config = UMT5Config(
        vocab_size=vocab_size,
        d_model=16,
        d_kv=4,
        d_ff=24,
        num_layers=TINY_LAYERS,
        num_heads=TINY_HEADS,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
    )
    torch.manual_seed(seed)
    model = UMT5EncoderModel(config).eval()
    # Unit norm weights would hide a norm1/norm2/final-norm mix-up.
    with torch.no_grad():
        for name, tensor in model.named_parameters():
            if "layer_norm" in name:
                tensor.uniform_(0.5, 1.5)
    return model


def tiny_sentencepiece_tokenizer():
    """A real transformers T5Tokenizer (Unigram, umT5's kind) built offline from a vocab list."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [("▁" + word, -3.0) for word in WORDS]
    pieces += [(letter, -6.0) for letter in "abcdefghijklmnopqrstuvwxyz"]
    return T5Tokenizer(vocab=pieces, extra_ids=0)


def to_wan_naming(model):
    """Written out by hand, independently of tether.text's table, from Wan's T5Encoder module names."""
    wan = {"token_embedding.weight": model.shared.weight, "norm.weight": model.encoder.final_layer_norm.weight}
    for n, block in enumerate(model.encoder.block):
        attention, feed_forward = block.layer[0], block.layer[1]
        wan[f"blocks.{n}.norm1.weight"] = attention.layer_norm.weight
        for name in "qkvo":
            wan[f"blocks.{n}.attn.{name}.weight"] = getattr(attention.SelfAttention, name).weight
        wan[f"blocks.{n}.pos_embedding.embedding.weight"] = attention.SelfAttention.relative_attention_bias.weight
        wan[f"blocks.{n}.norm2.weight"] = feed_forward.layer_norm.weight
        wan[f"blocks.{n}.ffn.gate.0.weight"] = feed_forward.DenseReluDense.wi_0.weight
        wan[f"blocks.{n}.ffn.fc1.weight"] = feed_forward.DenseReluDense.wi_1.weight
        wan[f"blocks.{n}.ffn.fc2.weight"] = feed_forward.DenseReluDense.wo.weight
    return {key: tensor.detach().clone() for key, tensor in wan.items()}


def wan_reference_encoder(weights, input_ids, attention_mask, max_distance=128):
    """Wan's T5 encoder math, written against Wan's weight names (no transformers)."""

    def rms_norm(x, weight):
        return weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)

    def bucket(relative):  # relative = key position - query position, bidirectional
        half = weights["blocks.0.pos_embedding.embedding.weight"].shape[0] // 2
        exact = half // 2
        distance = relative.abs()
        far = exact + (torch.log(distance.float().clamp(min=1) / exact) / math.log(max_distance / exact) * (half - exact)).long()
        return (relative > 0).long() * half + torch.where(distance < exact, distance, far.clamp(max=half - 1))

    batch, length = input_ids.shape
    positions = torch.arange(length)
    buckets = bucket(positions[None, :] - positions[:, None])
    x = weights["token_embedding.weight"][input_ids]
    for n in range(TINY_LAYERS):
        w = {key[len(f"blocks.{n}.") :]: value for key, value in weights.items() if key.startswith(f"blocks.{n}.")}
        h = rms_norm(x, w["norm1.weight"])
        q, k, v = (
            (h @ w[f"attn.{name}.weight"].T).view(batch, length, TINY_HEADS, -1).transpose(1, 2) for name in "qkv"
        )
        scores = q @ k.transpose(-1, -2) + w["pos_embedding.embedding.weight"][buckets].permute(2, 0, 1)
        scores = scores.masked_fill(attention_mask[:, None, None, :] == 0, float("-inf"))
        attended = (scores.softmax(-1) @ v).transpose(1, 2).reshape(batch, length, -1)
        x = x + attended @ w["attn.o.weight"].T
        h = rms_norm(x, w["norm2.weight"])
        gate = torch.nn.functional.gelu(h @ w["ffn.gate.0.weight"].T, approximate="tanh")
        x = x + (gate * (h @ w["ffn.fc1.weight"].T)) @ w["ffn.fc2.weight"].T
    return rms_norm(x, weights["norm.weight"])


@pytest.fixture
def wan_folder(tmp_path):
    """A miniature Wan2.1 model folder: the original-format checkpoint plus google/umt5-xxl/."""
    model = tiny_umt5()
    torch.save(to_wan_naming(model), tmp_path / WAN_T5_CHECKPOINT)
    tiny_sentencepiece_tokenizer().save_pretrained(tmp_path / "google" / "umt5-xxl")
    return tmp_path, model


def sample_ids():
    input_ids = torch.randint(3, 40, (2, 20))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 11:] = 0
    return input_ids, attention_mask


# ---------------------------------------------------------------- Wan checkpoint


def test_key_map_covers_every_transformers_weight():
    model = tiny_umt5()
    for key in model.state_dict():
        if key == "encoder.embed_tokens.weight":
            continue
        wan_key = transformers_key_to_wan(key)
        assert wan_key is not None, key
        assert wan_key_to_transformers(wan_key) == key
    assert set(map(transformers_key_to_wan, model.state_dict())) - {None} == set(to_wan_naming(model))


def test_wan_checkpoint_converts_exactly(wan_folder):
    folder, source_model = wan_folder
    converted = load_wan_t5_checkpoint(folder / WAN_T5_CHECKPOINT)
    assert converted.config.d_model == 16 and converted.config.num_layers == TINY_LAYERS
    assert converted.config.num_heads == TINY_HEADS and converted.config.d_ff == 24
    assert converted.shared.weight is converted.encoder.embed_tokens.weight

    input_ids, attention_mask = sample_ids()
    with torch.no_grad():
        expected = source_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        actual = converted(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        reference = wan_reference_encoder(to_wan_naming(source_model), input_ids, attention_mask)
    assert (actual - expected).abs().max() <= 1e-6
    # The map is right only if transformers computes what Wan's modules compute.
    real = attention_mask.bool()
    assert (actual[real] - reference[real]).abs().max() <= 1e-5


def test_load_text_encoder_from_wan_folder_and_pth(wan_folder):
    folder, source_model = wan_folder
    prompts = ["a red circle bounces", "the dotted green triangle rolls on sand"]
    for source in (folder, folder / WAN_T5_CHECKPOINT):
        encoder = load_text_encoder(source)
        assert encoder.text_len == 512 and encoder.dim == 16
        embeddings = encoder.encode(prompts)
        assert embeddings.shape == (2, 512, 16)

    input_ids, attention_mask = encoder.tokenizer.encode(prompts, 512)
    with torch.no_grad():
        expected = source_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    expected = expected * attention_mask[..., None]
    assert (embeddings - expected).abs().max() <= SHORTER_PADDING_TOLERANCE


def test_umt5_xxl_sizes_are_inferred_from_shapes():
    meta = lambda *shape: torch.empty(shape, device="meta")  # noqa: E731
    state_dict = {"token_embedding.weight": meta(256384, 4096), "norm.weight": meta(4096)}
    for n in range(24):
        state_dict[f"blocks.{n}.attn.q.weight"] = meta(4096, 4096)
        state_dict[f"blocks.{n}.pos_embedding.embedding.weight"] = meta(32, 64)
        state_dict[f"blocks.{n}.ffn.fc1.weight"] = meta(10240, 4096)
    config = umt5_config_from_wan_state_dict(state_dict)
    assert (config.vocab_size, config.d_model, config.d_ff, config.num_layers) == (256384, 4096, 10240, 24)
    assert (config.num_heads, config.d_kv, config.relative_attention_num_buckets) == (64, 64, 32)
    assert config.feed_forward_proj == "gated-gelu" and config.relative_attention_max_distance == 128


def test_bad_checkpoint_names_the_bad_keys(tmp_path):
    weights = to_wan_naming(tiny_umt5())
    del weights["blocks.1.norm2.weight"]
    weights["blocks.0.attn.extra.weight"] = torch.zeros(3)
    weights["blocks.0.ffn.fc2.weight"] = torch.zeros(16, 25)
    torch.save(weights, tmp_path / "broken.pth")
    with pytest.raises(TetherError) as error:
        load_wan_t5_checkpoint(tmp_path / "broken.pth")
    message = str(error.value)
    assert "1 missing" in message and "blocks.1.norm2.weight" in message
    assert "1 unexpected" in message and "blocks.0.attn.extra.weight" in message
    assert "1 shape mismatch" in message and "blocks.0.ffn.fc2.weight [16, 25] != [16, 24]" in message


class NotATensor:
    pass


def test_checkpoint_with_arbitrary_objects_is_refused(tmp_path):
    torch.save({"token_embedding.weight": NotATensor()}, tmp_path / "pickled.pth")
    with pytest.raises(TetherError, match="cannot read"):
        load_wan_t5_checkpoint(tmp_path / "pickled.pth")


def test_unrecognized_sources_raise(tmp_path):
    with pytest.raises(TetherError, match="not found"):
        load_text_encoder(tmp_path / "nowhere")
    with pytest.raises(TetherError, match="is not a text encoder"):
        load_text_encoder(tmp_path)
    torch.save(to_wan_naming(tiny_umt5()), tmp_path / "lonely.pth")
    with pytest.raises(TetherError, match="no tokenizer folder"):
        load_text_encoder(tmp_path / "lonely.pth")


# ---------------------------------------------------------------- diffusers layout


def test_diffusers_pipeline_folder(tmp_path):
    source_model = tiny_umt5()
    source_model.save_pretrained(tmp_path / "text_encoder")
    tokenizer = tiny_sentencepiece_tokenizer()
    tokenizer.save_pretrained(tmp_path / "tokenizer")

    encoder = load_text_encoder(tmp_path, text_len=16)
    assert isinstance(encoder.tokenizer, PretrainedTokenizer)
    prompts = ["a  red &amp; blue square", "the striped circle rolls on grass"]
    embeddings = encoder.encode(prompts)

    batch = tokenizer(["a red & blue square", "the striped circle rolls on grass"], padding="max_length",
                      max_length=16, return_tensors="pt")
    with torch.no_grad():
        expected = source_model(**batch).last_hidden_state * batch["attention_mask"][..., None]
    assert embeddings.shape == (2, 16, 16)
    assert (embeddings - expected).abs().max() <= SHORTER_PADDING_TOLERANCE


def test_diffusers_folder_with_missing_or_misshapen_weights_raises(tmp_path):
    from safetensors.torch import load_file, save_file

    tiny_umt5().save_pretrained(tmp_path / "text_encoder")
    tiny_sentencepiece_tokenizer().save_pretrained(tmp_path / "tokenizer")
    weights_file = tmp_path / "text_encoder" / "model.safetensors"
    weights = load_file(weights_file)
    del weights["encoder.block.1.layer.0.SelfAttention.q.weight"]
    weights["encoder.block.0.layer.1.DenseReluDense.wo.weight"] = torch.zeros(16, 25)
    save_file(weights, weights_file, metadata={"format": "pt"})
    with pytest.raises(TetherError) as error:
        load_text_encoder(tmp_path)
    assert "1 missing key(s): encoder.block.1.layer.0.SelfAttention.q.weight" in str(error.value)
    assert "encoder.block.0.layer.1.DenseReluDense.wo.weight [16, 25] != [16, 24]" in str(error.value)


# ---------------------------------------------------------------- encoding


@pytest.fixture(scope="module")
def toy_encoder():
    return make_toy_text_encoder(WORDS, dim=32, layers=2, heads=4, text_len=8)


def test_positions_past_the_prompt_are_zero(toy_encoder):
    embeddings = toy_encoder.encode(["a red circle", "the blue striped square bounces on grass"])
    token_counts = [4, 8]  # words + </s>, the second one cut to text_len
    for row, count in enumerate(token_counts):
        assert (embeddings[row, :count].abs().sum(-1) > 0).all()
        assert (embeddings[row, count:] == 0).all()


def test_long_prompts_are_truncated_to_text_len(toy_encoder):
    long_prompt = " ".join(WORDS * 3)
    assert toy_encoder.encode([long_prompt]).shape == (1, 8, 32)
    input_ids, attention_mask = toy_encoder.tokenizer.encode([long_prompt], 8)
    assert input_ids[0, -1] == WordTokenizer.EOS_ID and attention_mask.all()


def test_batch_matches_prompts_encoded_alone(toy_encoder):
    prompts = ["a red circle", "the green dotted triangle rolls on sand", "square"]
    toy_encoder.clear_cache()
    batch = toy_encoder.encode(prompts)
    for row, prompt in enumerate(prompts):
        toy_encoder.clear_cache()
        assert (toy_encoder.encode([prompt])[0] - batch[row]).abs().max() <= 1e-6


def test_each_prompt_is_encoded_once(toy_encoder):
    toy_encoder.clear_cache()
    calls = []
    hook = toy_encoder.model.register_forward_hook(lambda module, args, output: calls.append(1))
    try:
        first = toy_encoder.encode(["a red circle", "a red circle", "blue square"])
        second = toy_encoder.encode(["blue square", "a red circle"])
    finally:
        hook.remove()
    assert len(calls) == 1
    assert torch.equal(first[2], second[0]) and torch.equal(first[0], second[1])


def test_encoder_stays_in_eval_mode(toy_encoder):
    toy_encoder.train()
    assert not toy_encoder.model.training
    assert not any(p.requires_grad for p in toy_encoder.parameters())


# ---------------------------------------------------------------- word tokenizer


def test_word_tokenizer_ids_unknowns_and_punctuation(tmp_path):
    tokenizer = WordTokenizer.from_words(["Red", "circle", "red", "zig-zag", "traffic light"])
    assert tokenizer.vocab == ["<pad>", "</s>", "<unk>", "red", "circle", "zig-zag", "traffic", "light"]
    input_ids, attention_mask = tokenizer.encode(["A RED, zig-zag circle!", ""], max_length=6)
    assert input_ids.tolist() == [[2, 3, 5, 4, 1, 0], [1, 0, 0, 0, 0, 0]]
    assert attention_mask.tolist() == [[1, 1, 1, 1, 1, 0], [1, 0, 0, 0, 0, 0]]

    tokenizer.save(tmp_path / "words.json")
    reloaded = WordTokenizer.load(tmp_path / "words.json")
    assert reloaded.vocab == tokenizer.vocab
    assert torch.equal(reloaded.encode(["red circle"], 4)[0], tokenizer.encode(["red circle"], 4)[0])


def test_word_tokenizer_rejects_foreign_json(tmp_path):
    (tmp_path / "tokenizer.json").write_text('{"model": {}}')
    with pytest.raises(TetherError, match="not a tether word tokenizer"):
        WordTokenizer.load(tmp_path / "tokenizer.json")


# ---------------------------------------------------------------- toy format


def test_toy_save_load_round_trip(tmp_path, toy_encoder):
    save_toy_text_encoder(toy_encoder, tmp_path / "toy")
    loaded = load_text_encoder(tmp_path / "toy")
    assert isinstance(loaded, TextEncoder) and loaded.text_len == 8 and loaded.dim == 32
    prompts = ["a red circle bounces", "the dotted square rolls on grass", "unknown words here"]
    assert torch.equal(loaded.encode(prompts), toy_encoder.encode(prompts))

    half = load_text_encoder(tmp_path / "toy", dtype=torch.bfloat16)
    assert half.encode(prompts).dtype == torch.bfloat16


def test_toy_encoder_is_reproducible_and_leaves_global_rng_alone():
    state = torch.get_rng_state()
    first = make_toy_text_encoder(WORDS, dim=16, layers=1, heads=2, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    second = make_toy_text_encoder(WORDS, dim=16, layers=1, heads=2, seed=3)
    assert torch.equal(first.encode(["a red circle"]), second.encode(["a red circle"]))
    assert first.text_len == 32


def test_toy_folder_with_wrong_weights_raises(tmp_path, toy_encoder):
    from safetensors.torch import load_file, save_file

    save_toy_text_encoder(toy_encoder, tmp_path)
    weights = load_file(tmp_path / "text_encoder.safetensors")
    weights["shared.weight"] = weights["shared.weight"][:5]
    save_file(weights, tmp_path / "text_encoder.safetensors")
    with pytest.raises(TetherError, match="shared.weight"):
        load_text_encoder(tmp_path)
