"""How big a model is and what training it takes, from its config.json alone (before any download).

`run` checks disk and memory before the first slow step with these numbers; `train` prints a
finer estimate once the model is loaded (training/trainee.estimate_memory, the same formula on
the real arrays). Every family is counted the same way, layer by layer, so Gemma 4's per-layer
input embeddings (PLE), its KV-shared and double-wide layers and its wider full-attention heads
are in the count, and a multimodal config is counted by its language model (what convert keeps).
"""

from __future__ import annotations

from .families import family_of_config, is_multimodal

CHUNK_ROWS = 16384  # training/chunked_loss's vocabulary chunk (kept equal by tests/test_sizing)
QUANT_GROUP = 64  # MLX's default group: a float scale and bias per 64 weights


def text_part(config: dict) -> dict:
    """The language model's config: a multimodal config's text_config filled in, else the config itself."""
    from .formats.language_model import mlx_keys, text_config

    return text_config(config, family_of_config(config)) if is_multimodal(config) else mlx_keys(config)


def _layer_types(text: dict) -> list[str]:
    layers = text["num_hidden_layers"]
    if text.get("layer_types"):
        return list(text["layer_types"])[:layers]
    pattern = int(text.get("sliding_window_pattern") or 6)
    return ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(layers)]


def _layers(text: dict) -> list[dict]:
    """Per layer: head size, whether it has its own keys/values (how many heads, and whether the keys are
    also the values: no value projection), MLP width (what the parameters hang on)."""
    layers = text["num_hidden_layers"]
    first_shared = layers - int(text.get("num_kv_shared_layers") or 0)
    head_dim = int(text.get("head_dim") or 256)
    wide_head = int(text.get("global_head_dim") or head_dim)
    kv_heads = int(text.get("num_key_value_heads") or 1)
    found = []
    for i, kind in enumerate(_layer_types(text)):
        shared = i >= first_shared
        keys_are_values = bool(text.get("attention_k_eq_v")) and kind == "full_attention"  # Gemma 4 26B/31B
        found.append({
            "head": wide_head if kind == "full_attention" else head_dim,
            "own_kv": not shared,
            "kv_heads": int(text.get("num_global_key_value_heads") or kv_heads) if keys_are_values else kv_heads,
            "kv_projections": 1 if keys_are_values else 2,
            "intermediate": text["intermediate_size"] * (2 if text.get("use_double_wide_mlp") and shared else 1),
        })
    return found


def parameter_count(config: dict) -> dict:
    """Parameters by part: embedding, per-layer embeddings (Gemma 4's PLE), transformer layers, output layer."""
    text = text_part(config)
    hidden, vocab = text["hidden_size"], text["vocab_size"]
    heads = text.get("num_attention_heads", 4)
    ple = int(text.get("hidden_size_per_layer_input") or 0)  # Gemma 4's per-layer inputs; absent in Gemma 3
    layers = 0
    for layer in _layers(text):
        layers += 2 * hidden * heads * layer["head"]  # q and o
        layers += layer["kv_projections"] * hidden * layer["kv_heads"] * layer["head"] if layer["own_kv"] else 0
        layers += 3 * hidden * layer["intermediate"]
        layers += 2 * hidden * ple  # the per-layer input gate and projection
    count = text["num_hidden_layers"]
    per_layer_embedding = (int(text.get("vocab_size_per_layer_input") or vocab) * count * ple + hidden * count * ple) if ple else 0
    output = 0 if text.get("tie_word_embeddings", True) else vocab * hidden
    parts = {"embedding": vocab * hidden, "per_layer_embedding": per_layer_embedding, "layers": layers, "output": output}
    return {**parts, "total": sum(parts.values())}


def lora_parameters(config: dict, rank: int = 8, num_layers: int = 16) -> int:
    """LoRA parameters on every linear layer of the last `num_layers` layers (mlx-lm's default keys):
    q, k, v, o, gate, up, down, and Gemma 4's per-layer input gate and projection."""
    text = text_part(config)
    hidden, heads = text["hidden_size"], text.get("num_attention_heads", 4)
    ple = int(text.get("hidden_size_per_layer_input") or 0)
    total = 0
    for layer in _layers(text)[-num_layers:]:
        projections = [(hidden, heads * layer["head"]), (heads * layer["head"], hidden)] + [(hidden, ple)] * (2 if ple else 0)
        if layer["own_kv"]:
            projections += [(hidden, layer["kv_heads"] * layer["head"])] * layer["kv_projections"]
        projections += [(hidden, layer["intermediate"])] * 2 + [(layer["intermediate"], hidden)]
        total += sum(rank * (a + b) for a, b in projections)
    return total


def training_memory(config: dict, dtype: str = "float32", bits: int | None = None, rank: int = 8, batch: int = 4,
                    max_length: int = 256, trained_per_example: int = 128, num_layers: int = 16,
                    base: bool = True) -> dict:
    """Peak training memory in bytes, by part (the formula of trainee.estimate_memory, from the config).

    Weights (float, or `bits` plus a scale and bias per group); LoRA weights with their gradient
    and two Adam moments; activations kept for the backward pass (a base model trains its turn
    rows, so the backward reaches every layer); the float32 logits of the trained positions, in
    vocabulary chunks where the chunked loss applies (a plain or quantized output layer) and whole where
    it does not (Gemma 4's capped logits). A quantized output layer is chunked too (quantized matmuls
    on one chunk of packed rows at a time).
    """
    text = text_part(config)
    itemsize = {"float32": 4, "bfloat16": 2, "float16": 2}[dtype]
    params = parameter_count(config)["total"]
    weights = params * (bits / 8 + 2 * itemsize / QUANT_GROUP) if bits else params * itemsize
    layers = _layers(text)
    adapted = min(num_layers, len(layers)) if num_layers > 0 else len(layers)
    trainable = (lora_parameters(config, rank, adapted) + (2 * text["hidden_size"] if base else 0)) * 4 * 4
    hidden, heads = text["hidden_size"], text.get("num_attention_heads", 4)
    tokens = batch * max_length
    per_layer = [tokens * (12 * hidden + 4 * layer["intermediate"]) * itemsize + batch * heads * max_length ** 2 * 4 * 2
                 for layer in layers]
    backward = len(layers) if base else adapted
    activations = max(per_layer) * backward
    chunked = not text.get("final_logit_softcapping")
    columns = min(text["vocab_size"], CHUNK_ROWS) if chunked else text["vocab_size"]
    logits = batch * trained_per_example * columns * 4 * 3
    parts = {"weights": int(weights), "trainable": trainable, "activations": activations, "logits": logits}
    return {**parts, "total": sum(parts.values()), "chunked_loss": chunked}
