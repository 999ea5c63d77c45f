"""The one table of tensor names between llama.cpp's GGUF files and Hugging Face's Gemma 3, both ways.

Read by convert (GGUF in), written by export (GGUF out) and by the tiny test files: one table, so the
three can never disagree.
"""

from __future__ import annotations

import re

from ..errors import CheckpointError

# GGUF tensor names (per block, after "blk.N.") -> Hugging Face names (after "model.layers.N.").
BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")


def hf_name(gguf_name: str) -> str:
    """The Hugging Face parameter name of a GGUF tensor; an unknown name is an error."""
    match = _BLOCK.match(gguf_name)
    if match and match.group(2) in BLOCK_NAMES:
        layer, part, kind = match.groups()
        return f"model.layers.{layer}.{BLOCK_NAMES[part]}.{kind}"
    stem, _, kind = gguf_name.rpartition(".")
    if stem in TOP_NAMES:
        return f"{TOP_NAMES[stem]}.{kind}"
    raise CheckpointError(
        f"The GGUF file has a tensor '{gguf_name}' that a Gemma 3 text model does not have. "
        "It may be a newer or multimodal variant; convert the Hugging Face checkpoint instead."
    )


def gguf_name(hf_name: str) -> str:
    """The GGUF tensor name of a Hugging Face parameter: hf_name's table, read the other way."""
    block = re.match(r"^model\.layers\.(\d+)\.(.+)\.(weight|bias)$", hf_name)
    if block:
        layer, part, kind = block.groups()
        for gguf_part, hf_part in BLOCK_NAMES.items():
            if hf_part == part:
                return f"blk.{layer}.{gguf_part}.{kind}"
    stem, _, kind = hf_name.rpartition(".")
    for gguf_stem, hf_stem in TOP_NAMES.items():
        if hf_stem == stem:
            return f"{gguf_stem}.{kind}"
    raise CheckpointError(f"The model has a parameter '{hf_name}' that a Gemma 3 GGUF file has no name for.")
