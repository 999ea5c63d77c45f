"""A small numpy forward pass of Gemma 3 text models, written from the architecture description.

It reads the *Hugging Face* weights directly, so comparing its logits with the converted MLX model
checks the whole conversion (names, dtypes, tied embeddings, norms, RoPE bases) independently of mlx-lm.
"""

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file


def _rms_norm(x, weight, eps):
    # Gemma scales by (1 + weight), not weight.
    variance = np.mean(x.astype(np.float64) ** 2, axis=-1, keepdims=True)
    return (x / np.sqrt(variance + eps)) * (1.0 + weight)


def _rope(x, base):
    """Rotate-half RoPE over the last dim; x: [heads, seq, head_dim]."""
    _, seq, dim = x.shape
    inv_freq = base ** (-np.arange(0, dim, 2, dtype=np.float64) / dim)
    angles = np.arange(seq)[:, None] * inv_freq[None, :]  # [seq, dim/2]
    cos, sin = np.cos(angles), np.sin(angles)
    first, second = x[..., : dim // 2], x[..., dim // 2 :]
    return np.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)


def _gelu_tanh(x):
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))


def reference_logits(checkpoint: Path, token_ids: list[int]) -> np.ndarray:
    """Logits [seq, vocab] for one sequence, float64, from an HF Gemma 3 text checkpoint."""
    checkpoint = Path(checkpoint)
    cfg = json.loads((checkpoint / "config.json").read_text())
    w = {k: v.astype(np.float64) for k, v in load_file(str(checkpoint / "model.safetensors")).items()}
    eps, heads, kv_heads, head_dim = cfg["rms_norm_eps"], cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    seq = len(token_ids)

    h = w["model.embed_tokens.weight"][token_ids] * np.sqrt(cfg["hidden_size"])
    causal = np.triu(np.full((seq, seq), -np.inf), k=1)
    window = cfg["sliding_window"]
    sliding_mask = causal + np.where(np.subtract.outer(np.arange(seq), np.arange(seq)) >= window, -np.inf, 0.0)

    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}"
        is_global = (i + 1) % cfg["sliding_window_pattern"] == 0
        base = cfg["rope_theta"] if is_global else cfg["rope_local_base_freq"]

        x = _rms_norm(h, w[f"{p}.input_layernorm.weight"], eps)
        q = (x @ w[f"{p}.self_attn.q_proj.weight"].T).reshape(seq, heads, head_dim).transpose(1, 0, 2)
        k = (x @ w[f"{p}.self_attn.k_proj.weight"].T).reshape(seq, kv_heads, head_dim).transpose(1, 0, 2)
        v = (x @ w[f"{p}.self_attn.v_proj.weight"].T).reshape(seq, kv_heads, head_dim).transpose(1, 0, 2)
        q = _rope(_rms_norm(q, w[f"{p}.self_attn.q_norm.weight"], eps), base)
        k = _rope(_rms_norm(k, w[f"{p}.self_attn.k_norm.weight"], eps), base)
        k, v = np.repeat(k, heads // kv_heads, axis=0), np.repeat(v, heads // kv_heads, axis=0)
        scores = q @ k.transpose(0, 2, 1) * cfg["query_pre_attn_scalar"] ** -0.5
        scores = scores + (causal if is_global else sliding_mask)
        scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
        attn = (scores / scores.sum(axis=-1, keepdims=True)) @ v  # [heads, seq, head_dim]
        attn = attn.transpose(1, 0, 2).reshape(seq, heads * head_dim) @ w[f"{p}.self_attn.o_proj.weight"].T
        h = h + _rms_norm(attn, w[f"{p}.post_attention_layernorm.weight"], eps)

        x = _rms_norm(h, w[f"{p}.pre_feedforward_layernorm.weight"], eps)
        gate = _gelu_tanh(x @ w[f"{p}.mlp.gate_proj.weight"].T)
        mlp = (gate * (x @ w[f"{p}.mlp.up_proj.weight"].T)) @ w[f"{p}.mlp.down_proj.weight"].T
        h = h + _rms_norm(mlp, w[f"{p}.post_feedforward_layernorm.weight"], eps)

    h = _rms_norm(h, w["model.norm.weight"], eps)
    return h @ w["model.embed_tokens.weight"].T
