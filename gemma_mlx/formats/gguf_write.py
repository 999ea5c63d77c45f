"""Write a Gemma 3 model as a llama.cpp GGUF file (`gemma-mlx export MODEL --gguf DIR`).

mlx-lm cannot write Gemma 3 GGUF files, so this does, with the `gguf` package's GGUFWriter. The
file is the mirror image of what formats/gguf.py reads:

- tensor names come from the reader's table, reversed; dims are reversed by the writer itself;
- Gemma's RMSNorm weights are stored as (1 + w), as llama.cpp's own converter stores them;
- the embedding stays tied (no `output.weight`);
- the tokenizer is the SentencePiece vocabulary llama.cpp expects (`tokenizer.ggml.model = llama`):
  pieces in id order, scores that rank the pieces as their merge order does, token types, the
  special ids, `<end_of_turn>` as end-of-turn token and our Gemma turn template.

Quantization: the `gguf` package can quantize Q8_0 and Q4_0 itself. K-quants (Q4_K_M, ...) need
llama.cpp's C++ `llama-quantize`; they are not offered here rather than faked.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import CheckpointError
from ..manifest import Progress, quiet
from .gguf import ARCHITECTURE, FAMILY
from .gguf_names import gguf_name

QUANTS = ("f16", "q8_0", "q4_0", "f32")
SPACE_PIECE = "\u2581"
UNK_ID = FAMILY.unk_id


def _is_byte_piece(token: str) -> bool:
    return len(token) == 6 and token.startswith("<0x") and token.endswith(">")


def check_model_type(config: dict) -> None:
    """Only the family whose llama.cpp layout formats/gguf_names knows (Gemma 3) can be written."""
    if config.get("model_type") not in FAMILY.model_types:
        raise CheckpointError(f"The model's type is {config.get('model_type')!r}; only {FAMILY.title} text models "
                              f"({FAMILY.text_model_type}) can be exported to GGUF so far. Export it to Hugging Face "
                              "instead (`gemma-mlx fuse --export-hf`).")


def check_tokenizer(tokenizer_json: dict) -> None:
    """Only Gemma's own vocabulary can be written as a SentencePiece GGUF vocabulary that llama.cpp
    tokenizes the same way; anything else is refused before any weights load."""
    model = tokenizer_json.get("model") or {}
    normalizer = json.dumps(tokenizer_json.get("normalizer"), ensure_ascii=False)
    if model.get("type") != "BPE" or not model.get("byte_fallback") or SPACE_PIECE not in normalizer:
        raise CheckpointError(
            "The model's tokenizer is not Gemma's SentencePiece vocabulary (a BPE with byte fallback that writes "
            f"spaces as '{SPACE_PIECE}'), so llama.cpp could not tokenize text for it the same way. Export a model "
            "converted from a Gemma 3 checkpoint or GGUF file. (The tiny test checkpoints built from Hugging Face "
            "files use a byte-level tokenizer; those converted from a tiny GGUF file can be exported.)"
        )


def sentencepiece_vocab(tokenizer_json: dict, vocab_size: int) -> tuple[list[str], list[float], list[int]]:
    """(pieces, scores, types) for llama.cpp from a Gemma tokenizer.json, `vocab_size` entries long.

    A Gemma tokenizer.json is a BPE over SentencePiece pieces with byte fallback; its merge order is
    the pieces' id order, so the score of the n-th ordinary piece is -n (what Google's SentencePiece
    model holds). Added tokens are control (special) or user-defined pieces; runs of two or more
    spaces are user-defined pieces written as real spaces, as SentencePiece writes them. Rows the
    embedding has beyond the tokenizer become unused placeholders.
    """
    import gguf

    check_tokenizer(tokenizer_json)
    model = tokenizer_json["model"]
    pieces: dict[int, str] = {int(i): t for t, i in model["vocab"].items()}
    added = {int(t["id"]): t for t in tokenizer_json.get("added_tokens") or []}
    for token_id, token in added.items():
        pieces.setdefault(token_id, token["content"])
    T = gguf.TokenType
    tokens, scores, types = [], [], []
    ordinary = 0
    for token_id in range(vocab_size):
        piece = pieces.get(token_id)
        if piece is None:
            tokens.append(f"<unused_row_{token_id}>")
            scores.append(-1000.0)
            types.append(T.UNUSED)
        elif token_id in added:
            tokens.append(piece)
            scores.append(-1000.0)
            types.append(T.CONTROL if added[token_id].get("special") else T.USER_DEFINED)
        elif len(piece) > 1 and set(piece) == {SPACE_PIECE}:
            tokens.append(" " * len(piece))
            scores.append(-1000.0)
            types.append(T.USER_DEFINED)
        elif _is_byte_piece(piece):
            tokens.append(piece)
            scores.append(0.0)
            types.append(T.BYTE)
        else:
            tokens.append(piece)
            scores.append(-float(ordinary))
            types.append(T.NORMAL)
            ordinary += 1
    return tokens, scores, [int(t) for t in types]


def _add_hyperparameters(writer, config: dict) -> None:
    """Every `gemma3.*` key llama.cpp's loader reads, from an MLX/HF Gemma 3 config."""
    head_dim = int(config.get("head_dim", 256))
    writer.add_context_length(int(config.get("max_position_embeddings", 32768)))
    writer.add_embedding_length(int(config["hidden_size"]))
    writer.add_block_count(int(config["num_hidden_layers"]))
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_head_count(int(config["num_attention_heads"]))
    writer.add_head_count_kv(int(config.get("num_key_value_heads", 1)))
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    writer.add_rope_freq_base(float(config.get("rope_theta", 1_000_000.0)))
    writer.add_rope_freq_base_swa(float(config.get("rope_local_base_freq", 10_000.0)))
    writer.add_sliding_window(int(config.get("sliding_window", 512)))
    scaling = config.get("rope_scaling") or {}
    if scaling.get("factor") and scaling.get("rope_type", scaling.get("type")) == "linear":
        import gguf

        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(scaling["factor"]))


def _add_tokenizer(writer, tokenizer_json: dict, vocab_size: int) -> None:
    tokens, scores, types = sentencepiece_vocab(tokenizer_json, vocab_size)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(FAMILY.bos_id)
    writer.add_eos_token_id(FAMILY.eos_id)
    writer.add_unk_token_id(FAMILY.unk_id)
    writer.add_pad_token_id(FAMILY.pad_id)
    writer.add_eot_token_id(FAMILY.turn_end_id)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(False)
    writer.add_chat_template(FAMILY.chat_template())


def _tensor_type(name: str, shape: tuple, quant: str):
    """The GGML type one tensor is stored in: norms stay float32; a quantized file keeps the tied
    embedding (also the output layer) at Q8_0, as llama.cpp's own presets keep it above 4 bits."""
    import gguf

    Q = gguf.GGMLQuantizationType
    if len(shape) < 2 or quant == "f32":
        return Q.F32
    if quant == "f16":
        return Q.F16
    block = gguf.GGML_QUANT_SIZES[Q.Q8_0][0]
    if shape[-1] % block:
        return Q.F16  # rows that do not split into 32-value blocks cannot be quantized
    if quant == "q4_0" and name != "token_embd.weight":
        return Q.Q4_0
    return Q.Q8_0


FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "q8_0": "MOSTLY_Q8_0", "q4_0": "MOSTLY_Q4_0"}


def write_gguf(path: Path, weights: dict, config: dict, tokenizer_json: dict, name: str, quant: str = "f16",
               progress: Progress = quiet) -> dict:
    """Write `weights` (HF names -> float numpy arrays) as a gemma3 GGUF file; return the tensor type counts.

    The caller writes into a temporary path and renames it, so a failed write leaves nothing.
    """
    import gguf
    import numpy as np
    from collections import Counter

    if quant not in QUANTS:
        raise CheckpointError(f"Unknown GGUF quantization {quant!r}. Choose one of: {', '.join(QUANTS)} (K-quants such "
                              "as Q4_K_M need llama.cpp's llama-quantize on the f16 file).")
    check_model_type(config)
    embed = weights["model.embed_tokens.weight"]
    writer = gguf.GGUFWriter(str(path), ARCHITECTURE)
    writer.add_type("model")
    writer.add_name(name)
    writer.add_license("gemma")
    writer.add_file_type(getattr(gguf.LlamaFileType, FILE_TYPES[quant]))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_hyperparameters(writer, config)
    _add_tokenizer(writer, tokenizer_json, int(embed.shape[0]))
    types = Counter()
    for hf_name, value in weights.items():
        name_in_file = gguf_name(hf_name)
        value = np.asarray(value, dtype=np.float32)
        if hf_name.endswith("norm.weight"):
            value = value + 1.0  # llama.cpp folds Gemma's (1 + w) into the stored weight
        qtype = _tensor_type(name_in_file, value.shape, quant)
        types[qtype.name] += 1
        if qtype == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(name_in_file, value)
        elif qtype == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(name_in_file, value.astype(np.float16))
        else:
            writer.add_tensor(name_in_file, gguf.quants.quantize(value, qtype), raw_dtype=qtype)
    progress(f"writing {path.name}: {sum(types.values())} tensors ({', '.join(f'{n} {k}' for k, n in types.most_common())})")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dict(types)
