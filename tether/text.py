"""Text conditioning: prompt strings -> umT5 encoder embeddings.

The video transformer is conditioned on `[B, text_len, dim]` text embeddings
produced the way Wan2.1 produces them: umT5 encodes the tokenized prompt
(with `</s>` appended), and every position past the prompt's real token
count is exactly zero. Wan pads to 512 tokens; the toy model uses a short
length such as 32.

Three on-disk formats load into the same `TextEncoder` (a tokenizer plus a
transformers `UMT5EncoderModel`):

* Wan2.1 original: `models_t5_umt5-xxl-enc-bf16.pth`, a state dict in Wan's
  own T5 naming, plus a `google/umt5-xxl/` tokenizer folder. The weights are
  renamed into transformers' naming (`WAN_TO_TRANSFORMERS_KEYS`).
* A diffusers Wan pipeline folder: `text_encoder/` and `tokenizer/`.
* tether's toy format: `text_encoder.safetensors`,
  `text_encoder_config.json` and a word-level `tokenizer.json`.

Use `load_text_encoder(path)` for all of them and `make_toy_text_encoder`
to build a fresh toy encoder.
"""

from __future__ import annotations

import html
import json
import re
import string
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers import AutoTokenizer, UMT5Config, UMT5EncoderModel

from tether.errors import TetherError

WAN_TEXT_LEN = 512
TOY_TEXT_LEN = 32

WAN_T5_CHECKPOINT = "models_t5_umt5-xxl-enc-bf16.pth"
WAN_TOKENIZER_DIR = "google/umt5-xxl"
# Where a tokenizer may sit next to a lone `.pth` checkpoint, in search order.
SIBLING_TOKENIZER_DIRS = (WAN_TOKENIZER_DIR, "tokenizer", "umt5-xxl")

DIFFUSERS_ENCODER_DIR = "text_encoder"
DIFFUSERS_TOKENIZER_DIR = "tokenizer"

TOY_WEIGHTS_FILE = "text_encoder.safetensors"
TOY_CONFIG_FILE = "text_encoder_config.json"
TOY_TOKENIZER_FILE = "tokenizer.json"

# Wan2.1's umt5-xxl encoder. When converting a checkpoint, sizes are read off
# tensor shapes; this supplies what shapes cannot tell (activation, maximum
# relative distance, epsilon) and stands in for sizes whose tensors are absent.
UMT5_XXL_CONFIG = dict(
    vocab_size=256384,
    d_model=4096,
    d_ff=10240,
    num_heads=64,
    d_kv=64,
    num_layers=24,
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
    feed_forward_proj="gated-gelu",
    layer_norm_epsilon=1e-6,
)

# transformers ties the stack's input embedding to `shared`; files store it once.
TIED_EMBEDDING_KEY = "encoder.embed_tokens.weight"

# Wan's T5 naming -> transformers' UMT5 naming. `{n}` is the block index.
WAN_TO_TRANSFORMERS_KEYS = {
    "token_embedding.weight": "shared.weight",
    "blocks.{n}.norm1.weight": "encoder.block.{n}.layer.0.layer_norm.weight",
    "blocks.{n}.attn.q.weight": "encoder.block.{n}.layer.0.SelfAttention.q.weight",
    "blocks.{n}.attn.k.weight": "encoder.block.{n}.layer.0.SelfAttention.k.weight",
    "blocks.{n}.attn.v.weight": "encoder.block.{n}.layer.0.SelfAttention.v.weight",
    "blocks.{n}.attn.o.weight": "encoder.block.{n}.layer.0.SelfAttention.o.weight",
    "blocks.{n}.pos_embedding.embedding.weight": (
        "encoder.block.{n}.layer.0.SelfAttention.relative_attention_bias.weight"
    ),
    "blocks.{n}.norm2.weight": "encoder.block.{n}.layer.1.layer_norm.weight",
    # Wan computes fc2(fc1(x) * gelu(gate(x))); transformers puts the
    # activation on wi_0, so the gate is wi_0 and fc1 is wi_1.
    "blocks.{n}.ffn.gate.0.weight": "encoder.block.{n}.layer.1.DenseReluDense.wi_0.weight",
    "blocks.{n}.ffn.fc1.weight": "encoder.block.{n}.layer.1.DenseReluDense.wi_1.weight",
    "blocks.{n}.ffn.fc2.weight": "encoder.block.{n}.layer.1.DenseReluDense.wo.weight",
    "norm.weight": "encoder.final_layer_norm.weight",
}


# --------------------------------------------------------------------------
# Tokenizers. Both kinds expose `encode(texts, max_length) -> (ids, mask)`,
# right-padded, with `</s>` appended, so `TextEncoder` does not care which.
# --------------------------------------------------------------------------


class WordTokenizer:
    """Word-level tokenizer over a fixed word list (the toy world's vocabulary).

    Ids follow the T5 convention: `<pad>`=0, `</s>`=1, `<unk>`=2, then the
    words in the order given. Text is lowercased, split on whitespace, and
    punctuation is stripped from both ends of each word (so "grass." is
    "grass" while an inner hyphen, as in "zig-zag", is kept). Words not in
    the list become `<unk>`. `</s>` ends every sequence; a prompt too long
    for `max_length` loses its last words, never its `</s>`, which is what
    transformers' T5 tokenizer does too.
    """

    PAD_ID, EOS_ID, UNK_ID = 0, 1, 2
    SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")
    FILE_FORMAT = "tether-word-tokenizer"

    def __init__(self, vocab: Sequence[str]):
        """`vocab` is the full id -> token list, starting with `SPECIAL_TOKENS`."""
        if tuple(vocab[: len(self.SPECIAL_TOKENS)]) != self.SPECIAL_TOKENS:
            raise TetherError(
                f"word tokenizer vocabulary must start with {list(self.SPECIAL_TOKENS)}, "
                f"got {list(vocab[:3])}"
            )
        self.vocab = list(vocab)
        self._id_of = {token: index for index, token in enumerate(self.vocab)}

    @classmethod
    def from_words(cls, words: Iterable[str]) -> WordTokenizer:
        """Build from a word list; entries are normalized like prompts and deduplicated."""
        ordered: dict[str, None] = {}
        for entry in words:
            for word in cls.split(entry):
                if word not in cls.SPECIAL_TOKENS:
                    ordered[word] = None
        return cls([*cls.SPECIAL_TOKENS, *ordered])

    @staticmethod
    def split(text: str) -> list[str]:
        """Lowercase, split on whitespace, strip surrounding punctuation, drop empties."""
        words = (word.strip(string.punctuation) for word in text.lower().split())
        return [word for word in words if word]

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def encode(self, texts: Sequence[str], max_length: int) -> tuple[Tensor, Tensor]:
        """Token ids and attention mask, both LongTensor `[len(texts), max_length]`."""
        if max_length < 1:
            raise ValueError(f"max_length must be at least 1 (room for </s>), got {max_length}")
        input_ids = torch.full((len(texts), max_length), self.PAD_ID, dtype=torch.long)
        attention_mask = torch.zeros((len(texts), max_length), dtype=torch.long)
        for row, text in enumerate(texts):
            ids = [self._id_of.get(word, self.UNK_ID) for word in self.split(text)]
            ids = ids[: max_length - 1] + [self.EOS_ID]
            input_ids[row, : len(ids)] = torch.tensor(ids)
            attention_mask[row, : len(ids)] = 1
        return input_ids, attention_mask

    def save(self, path: str | Path) -> None:
        """Write the vocabulary as JSON."""
        payload = {"format": self.FILE_FORMAT, "version": 1, "vocab": self.vocab}
        Path(path).write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> WordTokenizer:
        """Read a file written by `save`."""
        try:
            payload = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as error:
            raise TetherError(f"cannot read word tokenizer {path}: {error}") from None
        if not isinstance(payload, dict) or payload.get("format") != cls.FILE_FORMAT:
            raise TetherError(f"{path} is not a tether word tokenizer file")
        return cls(payload["vocab"])


class PretrainedTokenizer:
    """A transformers tokenizer (umT5's sentencepiece vocabulary) behind `encode`.

    Prompts are cleaned as Wan cleans them: HTML entities unescaped and runs
    of whitespace collapsed. (Wan also runs `ftfy.fix_text`, which only
    changes mis-decoded text; it is left out to avoid the dependency.)
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        # `TextEncoder` trims the batch to its longest prompt, which is only
        # correct when padding comes after the tokens.
        self.tokenizer.padding_side = "right"

    @classmethod
    def from_folder(cls, folder: str | Path) -> PretrainedTokenizer:
        """Load a tokenizer folder offline (needs `tokenizer.json`, or sentencepiece for `spiece.model`)."""
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        except (OSError, ValueError, ImportError) as error:
            raise TetherError(f"cannot load tokenizer from {folder}: {error}") from None
        return cls(tokenizer)

    @staticmethod
    def clean(text: str) -> str:
        text = html.unescape(html.unescape(text))
        return re.sub(r"\s+", " ", text).strip()

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    def encode(self, texts: Sequence[str], max_length: int) -> tuple[Tensor, Tensor]:
        """Token ids and attention mask, both LongTensor `[len(texts), max_length]`."""
        batch = self.tokenizer(
            [self.clean(text) for text in texts],
            padding="max_length",
            truncation=True,
            max_length=max_length,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        return batch["input_ids"].long(), batch["attention_mask"].long()


# --------------------------------------------------------------------------
# The encoder
# --------------------------------------------------------------------------


class TextEncoder(nn.Module):
    """Frozen umT5 encoder that turns prompts into `[B, text_len, dim]` embeddings.

    Positions past a prompt's token count (its words plus `</s>`) are exactly
    zero, as in Wan. Each distinct prompt is encoded once and kept in a cache,
    because a long stream asks for the same few prompts over and over; call
    `clear_cache()` to drop it.
    """

    def __init__(self, tokenizer: WordTokenizer | PretrainedTokenizer, model: UMT5EncoderModel, text_len: int):
        super().__init__()
        if text_len < 1:
            raise ValueError(f"text_len must be positive, got {text_len}")
        self.tokenizer = tokenizer
        self.model = model.eval().requires_grad_(False)
        self.text_len = text_len
        self._cache: dict[str, Tensor] = {}

    @property
    def dim(self) -> int:
        """Embedding width (4096 for umt5-xxl)."""
        return self.model.config.d_model

    def train(self, mode: bool = True) -> TextEncoder:
        # The encoder is frozen: a parent module's .train() must not switch
        # its dropout on.
        super().train(mode)
        self.model.eval()
        return self

    def clear_cache(self) -> None:
        """Forget every cached prompt embedding."""
        self._cache.clear()

    def forward(self, prompts: Sequence[str]) -> Tensor:
        return self.encode(prompts)

    # no_grad rather than inference_mode: callers may feed these embeddings
    # into layers they train, and inference tensors cannot be saved for backward.
    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> Tensor:
        """Embeddings `[len(prompts), text_len, dim]` on the model's device and dtype."""
        if isinstance(prompts, str):
            raise TypeError("TextEncoder.encode takes a list of prompts, not a single string")
        new_prompts = [prompt for prompt in dict.fromkeys(prompts) if prompt not in self._cache]
        if new_prompts:
            self._cache.update(zip(new_prompts, self._encode_uncached(new_prompts)))

        weight = self.model.shared.weight
        embeddings = torch.zeros(len(prompts), self.text_len, self.dim, device=weight.device, dtype=weight.dtype)
        for row, prompt in enumerate(prompts):
            prompt_embedding = self._cache[prompt]
            embeddings[row, : len(prompt_embedding)] = prompt_embedding
        return embeddings

    def embed(self, prompts: Sequence[str]) -> Tensor:
        """`encode` without its cache and with gradients: for training the encoder itself (the toy one)."""
        hidden, mask = self._hidden(list(prompts))
        hidden = hidden * mask[..., None].to(hidden.dtype)  # Wan's exact zeros past each prompt's tokens
        return torch.nn.functional.pad(hidden, (0, 0, 0, self.text_len - hidden.shape[1]))

    def _encode_uncached(self, prompts: list[str]) -> list[Tensor]:
        """One `[token_count, dim]` tensor per prompt."""
        hidden, mask = self._hidden(prompts)
        return [row[:count].clone() for row, count in zip(hidden, mask.sum(dim=1).tolist())]

    def _hidden(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """Encoder states `[B, longest, dim]` and the attention mask `[B, longest]` of a batch of prompts."""
        input_ids, attention_mask = self.tokenizer.encode(prompts, self.text_len)
        # Padded keys get exactly zero attention weight, so running only up to
        # the longest prompt gives Wan's pad-to-512 result at a fraction of the cost.
        longest = int(attention_mask.sum(dim=1).max())
        device = self.model.shared.weight.device
        mask = attention_mask[:, :longest].to(device)
        hidden = self.model(input_ids=input_ids[:, :longest].to(device), attention_mask=mask).last_hidden_state
        return hidden, mask


# --------------------------------------------------------------------------
# Wan2.1 original checkpoint -> transformers UMT5
# --------------------------------------------------------------------------


def _template_pattern(template: str) -> re.Pattern:
    return re.compile(re.escape(template).replace(re.escape("{n}"), r"(?P<n>\d+)") + "$")


_WAN_KEY_PATTERNS = [(_template_pattern(wan), hf) for wan, hf in WAN_TO_TRANSFORMERS_KEYS.items()]
_TRANSFORMERS_KEY_PATTERNS = [(_template_pattern(hf), wan) for wan, hf in WAN_TO_TRANSFORMERS_KEYS.items()]


def _rename(key: str, patterns: list[tuple[re.Pattern, str]]) -> str | None:
    for pattern, template in patterns:
        match = pattern.match(key)
        if match:
            return template.format(**match.groupdict())
    return None


def wan_key_to_transformers(key: str) -> str | None:
    """transformers' name for a Wan T5 encoder key, or None if it has none."""
    return _rename(key, _WAN_KEY_PATTERNS)


def transformers_key_to_wan(key: str) -> str | None:
    """Wan's name for a transformers UMT5 encoder key (None for the tied embedding copy)."""
    return _rename(key, _TRANSFORMERS_KEY_PATTERNS)


def umt5_config_from_wan_state_dict(state_dict: Mapping[str, Tensor]) -> UMT5Config:
    """Read the encoder's sizes off a Wan state dict's tensor shapes.

    A size whose tensors are all absent falls back to umt5-xxl's, so a broken
    checkpoint still reaches the key check that names what is wrong.
    """

    def first_shape(pattern: str) -> torch.Size | None:
        regex = re.compile(pattern + "$")
        return next((tensor.shape for key, tensor in state_dict.items() if regex.match(key)), None)

    embedding = first_shape(r"token_embedding\.weight")
    norm = first_shape(r"(blocks\.\d+\.norm[12]|norm)\.weight")
    position_bias = first_shape(r"blocks\.\d+\.pos_embedding\.embedding\.weight")
    query = first_shape(r"blocks\.\d+\.attn\.q\.weight")
    feed_forward = first_shape(r"blocks\.\d+\.ffn\.fc1\.weight")
    block_indices = [int(m.group(1)) for key in state_dict if (m := re.match(r"blocks\.(\d+)\.", key))]

    sizes = dict(UMT5_XXL_CONFIG)
    if embedding is not None and len(embedding) == 2:
        sizes["vocab_size"], sizes["d_model"] = embedding
    elif norm is not None and len(norm) == 1:
        sizes["d_model"] = norm[0]
    if position_bias is not None and len(position_bias) == 2:
        sizes["relative_attention_num_buckets"], sizes["num_heads"] = position_bias
    if query is not None and len(query) == 2 and query[0] % sizes["num_heads"] == 0:
        sizes["d_kv"] = query[0] // sizes["num_heads"]
    if feed_forward is not None and len(feed_forward) == 2:
        sizes["d_ff"] = feed_forward[0]
    if block_indices:
        sizes["num_layers"] = max(block_indices) + 1
    return UMT5Config(**sizes, dropout_rate=0.0, use_cache=False)


def _summarize(keys: list[str], limit: int = 5) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def check_state_dict(found: Mapping[str, Tensor], expected: Mapping[str, torch.Size], source: str) -> None:
    """Raise TetherError naming missing keys, unexpected keys and shape mismatches."""
    missing = [key for key in expected if key not in found]
    unexpected = [key for key in found if key not in expected]
    mismatched = [
        f"{key} {list(found[key].shape)} != {list(shape)}"
        for key, shape in expected.items()
        if key in found and found[key].shape != shape
    ]
    _raise_if_unfit(source, missing, unexpected, mismatched)


def _raise_if_unfit(source: str, missing: list[str], unexpected: list[str], mismatched: list[str]) -> None:
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s): {_summarize(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {_summarize(unexpected)}")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatch(es) (file != model): {_summarize(mismatched)}")
    if problems:
        raise TetherError(f"{source} does not fit a UMT5 text encoder: " + "; ".join(problems))


def _expected_shapes(model: nn.Module, rename: Callable[[str], str | None] = lambda key: key) -> dict[str, torch.Size]:
    return {
        rename(key): tensor.shape
        for key, tensor in model.state_dict().items()
        if key != TIED_EMBEDDING_KEY
    }


def _assign_weights(config: UMT5Config, state_dict: Mapping[str, Tensor]) -> UMT5EncoderModel:
    """A model that takes `state_dict`'s tensors as its own (no second copy in memory).

    `state_dict` is in transformers naming without the tied embedding key.
    """
    with torch.device("meta"):
        model = UMT5EncoderModel(config)
    weights = dict(state_dict)
    weights[TIED_EMBEDDING_KEY] = weights["shared.weight"]
    model.load_state_dict(weights, strict=True, assign=True)
    # assign=True wraps each entry in its own Parameter; re-tie so a later
    # dtype/device move converts the (large) embedding once.
    model.encoder.embed_tokens.weight = model.shared.weight
    return model


def load_wan_t5_checkpoint(path: str | Path, config: UMT5Config | None = None) -> UMT5EncoderModel:
    """Load a T5 encoder state dict in Wan's naming (`models_t5_umt5-xxl-enc-bf16.pth`) into transformers' UMT5.

    Sizes are read from tensor shapes unless `config` is given. The weights
    keep the file's dtype. Raises TetherError if the file does not fit.
    """
    path = Path(path)
    state_dict = _read_state_dict(path)
    if not isinstance(state_dict, Mapping) or not all(isinstance(t, Tensor) for t in state_dict.values()):
        raise TetherError(f"{path} is not a state dict of tensors")

    if config is None:
        config = umt5_config_from_wan_state_dict(state_dict)
    with torch.device("meta"):
        shape_model = UMT5EncoderModel(config)
    # Check in the file's own naming so the error names keys the user can find.
    check_state_dict(state_dict, _expected_shapes(shape_model, transformers_key_to_wan), str(path))
    renamed = {wan_key_to_transformers(key): tensor for key, tensor in state_dict.items()}
    return _assign_weights(config, renamed)


def _read_state_dict(path: Path):
    try:
        try:
            # mmap keeps the 11 GB file out of memory until tensors are used,
            # and the model then takes the tensors as they are.
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:
            # Files in torch's legacy (pre-zip) format cannot be memory-mapped.
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise TetherError(f"cannot read text encoder checkpoint {path}: {error}") from None


# --------------------------------------------------------------------------
# Loading any supported format
# --------------------------------------------------------------------------


def load_text_encoder(
    source: str | Path,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    *,
    text_len: int | None = None,
    tokenizer: str | Path | None = None,
) -> TextEncoder:
    """Load a text encoder from a local path, recognizing the format by its files.

    `source` may be
      * a Wan `.pth` checkpoint; its tokenizer is `tokenizer` or a sibling
        `google/umt5-xxl/` (or `tokenizer/`, `umt5-xxl/`) folder,
      * a Wan model folder holding `models_t5_umt5-xxl-enc-bf16.pth` and `google/umt5-xxl/`,
      * a diffusers pipeline folder holding `text_encoder/` and `tokenizer/`,
      * a toy folder holding `text_encoder.safetensors`, `text_encoder_config.json`, `tokenizer.json`.

    `dtype=None` keeps the stored dtype (bf16 for Wan's file). `text_len`
    defaults to 512 for Wan formats and to the saved value for the toy one.
    Nothing is downloaded.
    """
    path = Path(source).expanduser()
    if not path.exists():
        raise TetherError(f"text encoder not found: {path}")

    if path.is_file() and path.suffix == ".pth":
        tokenizer_folder = Path(tokenizer) if tokenizer else _sibling_tokenizer_folder(path)
        encoder = _load_wan(path, tokenizer_folder, text_len)
    elif path.is_dir() and (path / WAN_T5_CHECKPOINT).is_file():
        tokenizer_folder = Path(tokenizer) if tokenizer else _sibling_tokenizer_folder(path / WAN_T5_CHECKPOINT)
        encoder = _load_wan(path / WAN_T5_CHECKPOINT, tokenizer_folder, text_len)
    elif path.is_dir() and (path / DIFFUSERS_ENCODER_DIR).is_dir():
        encoder = _load_diffusers(path, Path(tokenizer) if tokenizer else None, dtype, text_len)
    elif path.is_dir() and (path / TOY_WEIGHTS_FILE).is_file():
        encoder = _load_toy(path, text_len)
    else:
        raise TetherError(
            f"{path} is not a text encoder: expected a Wan '.pth' checkpoint, a folder with "
            f"'{WAN_T5_CHECKPOINT}', a diffusers pipeline folder with '{DIFFUSERS_ENCODER_DIR}/' "
            f"and '{DIFFUSERS_TOKENIZER_DIR}/', or a toy folder with '{TOY_WEIGHTS_FILE}'"
        )
    return encoder.to(device=device, dtype=dtype)


def _sibling_tokenizer_folder(checkpoint: Path) -> Path:
    for name in SIBLING_TOKENIZER_DIRS:
        if (checkpoint.parent / name).is_dir():
            return checkpoint.parent / name
    raise TetherError(
        f"no tokenizer folder next to {checkpoint}: looked for {', '.join(SIBLING_TOKENIZER_DIRS)}; "
        "pass tokenizer=<folder>"
    )


def _load_wan(checkpoint: Path, tokenizer_folder: Path, text_len: int | None) -> TextEncoder:
    model = load_wan_t5_checkpoint(checkpoint)
    tokenizer = PretrainedTokenizer.from_folder(tokenizer_folder)
    return TextEncoder(tokenizer, model, text_len or WAN_TEXT_LEN)


def _describe_mismatch(item) -> str:
    if isinstance(item, tuple) and len(item) == 3:
        key, file_shape, model_shape = item
        return f"{key} {list(file_shape)} != {list(model_shape)}"
    return str(item)


def _load_diffusers(folder: Path, tokenizer_folder: Path | None, dtype, text_len: int | None) -> TextEncoder:
    tokenizer_folder = tokenizer_folder or folder / DIFFUSERS_TOKENIZER_DIR
    try:
        model, loading_info = UMT5EncoderModel.from_pretrained(
            str(folder / DIFFUSERS_ENCODER_DIR),
            dtype=dtype or "auto",
            local_files_only=True,
            output_loading_info=True,
            # Report mismatches below in tether's words instead of transformers' RuntimeError.
            ignore_mismatched_sizes=True,
        )
    except (OSError, ValueError) as error:
        raise TetherError(f"cannot load text encoder from {folder / DIFFUSERS_ENCODER_DIR}: {error}") from None
    # from_pretrained only warns about missing weights and leaves them random,
    # so those are errors here. Unexpected keys are let through: a full UMT5
    # checkpoint carries decoder weights the encoder never reads.
    _raise_if_unfit(
        str(folder / DIFFUSERS_ENCODER_DIR),
        missing=sorted(key for key in loading_info.get("missing_keys", []) if key != TIED_EMBEDDING_KEY),
        unexpected=[],
        mismatched=sorted(_describe_mismatch(item) for item in loading_info.get("mismatched_keys", [])),
    )
    tokenizer = PretrainedTokenizer.from_folder(tokenizer_folder)
    return TextEncoder(tokenizer, model, text_len or WAN_TEXT_LEN)


# --------------------------------------------------------------------------
# Toy format
# --------------------------------------------------------------------------


def make_toy_text_encoder(
    words: Iterable[str],
    dim: int = 64,
    layers: int = 2,
    heads: int = 4,
    text_len: int = TOY_TEXT_LEN,
    seed: int = 0,
    ffn_dim: int | None = None,
) -> TextEncoder:
    """A small randomly initialized umT5 over a word-level vocabulary.

    `ffn_dim` defaults to 2.5 * dim, umt5-xxl's ratio. Same arguments and
    seed give the same weights; the global RNG is left untouched.
    """
    if dim % heads:
        raise ValueError(f"dim ({dim}) must be divisible by heads ({heads})")
    tokenizer = WordTokenizer.from_words(words)
    config = UMT5Config(
        vocab_size=tokenizer.vocab_size,
        d_model=dim,
        d_kv=dim // heads,
        d_ff=ffn_dim or round(2.5 * dim),
        num_layers=layers,
        num_heads=heads,
        relative_attention_num_buckets=UMT5_XXL_CONFIG["relative_attention_num_buckets"],
        relative_attention_max_distance=UMT5_XXL_CONFIG["relative_attention_max_distance"],
        feed_forward_proj="gated-gelu",
        layer_norm_epsilon=1e-6,
        dropout_rate=0.0,
        use_cache=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = UMT5EncoderModel(config)
    return TextEncoder(tokenizer, model, text_len)


def save_toy_text_encoder(encoder: TextEncoder, folder: str | Path) -> None:
    """Write `encoder` (which must use a WordTokenizer) in the toy format.

    The config JSON is the UMT5Config dict plus a `text_len` entry.
    """
    from safetensors.torch import save_file

    if not isinstance(encoder.tokenizer, WordTokenizer):
        raise TetherError("only a text encoder with a word-level tokenizer can be saved in the toy format")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = {
        key: tensor.detach().cpu().contiguous()
        for key, tensor in encoder.model.state_dict().items()
        if key != TIED_EMBEDDING_KEY
    }
    save_file(weights, str(folder / TOY_WEIGHTS_FILE))
    config = encoder.model.config.to_dict()
    config["text_len"] = encoder.text_len
    (folder / TOY_CONFIG_FILE).write_text(json.dumps(config, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    encoder.tokenizer.save(folder / TOY_TOKENIZER_FILE)


def _load_toy(folder: Path, text_len: int | None) -> TextEncoder:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        config_dict = json.loads((folder / TOY_CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise TetherError(f"cannot read {folder / TOY_CONFIG_FILE}: {error}") from None
    saved_text_len = config_dict.pop("text_len", TOY_TEXT_LEN)
    config = UMT5Config.from_dict(config_dict)
    try:
        state_dict = load_file(str(folder / TOY_WEIGHTS_FILE))
    except (OSError, SafetensorError) as error:
        raise TetherError(f"cannot read {folder / TOY_WEIGHTS_FILE}: {error}") from None

    with torch.device("meta"):
        shape_model = UMT5EncoderModel(config)
    check_state_dict(state_dict, _expected_shapes(shape_model), str(folder / TOY_WEIGHTS_FILE))
    model = _assign_weights(config, state_dict)
    tokenizer = WordTokenizer.load(folder / TOY_TOKENIZER_FILE)
    if tokenizer.vocab_size > config.vocab_size:
        raise TetherError(
            f"{folder}: tokenizer has {tokenizer.vocab_size} tokens but the model embeds only {config.vocab_size}"
        )
    return TextEncoder(tokenizer, model, text_len or saved_text_len)
