"""Tiny, randomly initialised Gemma 3 and Gemma 4 text checkpoints in the real Hugging Face layout.

No Gemma can be downloaded in tests or CI, so we build stand-ins that exercise every code path a
real checkpoint does: hub-style config.json, HF parameter names in model.safetensors, a tokenizer
with Gemma's special tokens at Gemma's ids, generation_config.json, and the -pt/-it differences
(the -it flavour has a chat template and eos [<eos>, turn end]; the -pt one has neither).
Gemma 4 ones (write_tiny_gemma4_checkpoint) have its per-layer input embeddings, KV-shared and
double-wide layers, a wider head on full-attention layers and capped logits, and a multimodal
Gemma 3 one (write_tiny_multimodal_checkpoint) keeps its language model under `language_model.`.
Deterministic for a seed, built in about a second, no torch and no network.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from .config import SHIPPED_DATA
from .families import GEMMA3, GEMMA4, Family


def _special_tokens(family: Family, named: dict[int, str], last: int) -> list[str]:
    """Tokens 0..last at the family's ids: the named ones, <unusedN> in every other slot."""
    fixed = {family.pad_id: family.pad, family.eos_id: family.eos, family.bos_id: family.bos, family.unk_id: family.unk,
             family.turn_start_id: family.turn_start, family.turn_end_id: family.turn_end, **named}
    tokens, unused = [], 0
    for token_id in range(last + 1):
        if token_id in fixed:
            tokens.append(fixed[token_id])
        else:
            tokens.append(f"<unused{unused}>")
            unused += 1
    return tokens


# Ids 0..106 mirror Gemma 3: pad, eos, bos, unk, mask, [multimodal], <unused0..98>, turn tokens.
SPECIAL_TOKENS = _special_tokens(GEMMA3, GEMMA3.control_tokens, GEMMA3.turn_end_id)
# Ids 0..106 mirror Gemma 4: its tool, thinking and channel tokens at their ids; <unusedN> between.
GEMMA4_SPECIAL_TOKENS = _special_tokens(GEMMA4, GEMMA4.control_tokens, GEMMA4.turn_end_id)

TINY_SHAPE = dict(
    hidden_size=64,
    num_hidden_layers=6,  # mlx-lm's gemma3_text needs layers >= sliding_window_pattern
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=1,
    head_dim=16,
    vocab_size=1024,
)

# Our own words: enough English for a byte-level BPE to learn useful merges.
_TOKENIZER_CORPUS = """
I reckon we should play a game in the backyard today. Hooray! My little sister wants to be the
shopkeeper and I will be the customer. Mum says we can have lunch after the game, and Dad is going
to be a big grumpy monster who chases us around the garden. I don't know much about that, but I
can tell you about my favourite games. Can you help me with my homework? What should I do today?
Tell me a story about a dog who goes to the beach. I'm feeling sad because my friend went home.
When people disagree they can take turns and listen to each other. Quantum physics is about tiny
things that behave in strange ways. Let's pretend the floor is lava and we have to jump from the
couch to the cushions! That is heaps of fun. What is your name? How old are you? Where do you live?
The quick brown fox jumps over the lazy dog. Thank you very much, that was a lovely day.
"""


def tokenizer_corpus() -> str:
    """Text to learn merges from: our built-in paragraph plus the shipped persona data when present,
    so the tiny vocabulary is filled with real words (a random model then writes words, not gaps)."""
    shipped = SHIPPED_DATA / "bluey" / "conversations.jsonl"
    parts = [_TOKENIZER_CORPUS]
    if shipped.is_file():
        for line in shipped.read_text(encoding="utf-8").splitlines():
            if line.strip():
                parts.extend(message["content"] for message in json.loads(line).get("messages", []))
    return "\n".join(parts)


def build_tokenizer(corpus: str | None = None, vocab_size: int = TINY_SHAPE["vocab_size"],
                    special_tokens: list[str] | None = None):
    """A byte-level BPE tokenizer with Gemma's special tokens at Gemma's ids, kept whole.

    Every id below vocab_size is a real token: if the corpus yields fewer merges, the rest become
    more <unusedN> tokens, as in the real Gemma vocabulary.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    corpus = tokenizer_corpus() if corpus is None else corpus
    special_tokens = SPECIAL_TOKENS if special_tokens is None else special_tokens
    tokenizer = Tokenizer(models.BPE(unk_token=GEMMA3.unk))  # every family's <unk>
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([corpus] * 4, trainer=trainer)
    missing = vocab_size - tokenizer.get_vocab_size()
    if missing > 0:
        tokenizer = _with_unused_filler(tokenizer, missing, sum(t.startswith("<unused") for t in special_tokens))
    # Gemma's tokenizer prepends <bos> when asked to add special tokens.
    bos = special_tokens[GEMMA3.bos_id]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, GEMMA3.bos_id)]
    )
    for token_id, token in enumerate(special_tokens):
        assert tokenizer.token_to_id(token) == token_id, (token, tokenizer.token_to_id(token))
    return tokenizer


def _with_unused_filler(tokenizer, count: int, first_number: int):
    """Append `count` more <unusedN> entries to the BPE vocabulary itself.

    Plain vocabulary entries (no merge reaches them), not added tokens: transformers loads tens of
    thousands of added tokens slowly, and nothing but their <unusedN> names matters here.
    """
    from tokenizers import Tokenizer

    spec = json.loads(tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    first = len(vocab)
    for offset in range(count):
        vocab[f"<unused{first_number + offset}>"] = first + offset
    return Tokenizer.from_str(json.dumps(spec))


def _eos(family: Family, flavour: str):
    return list(family.stop_token_ids) if flavour == "it" else family.eos_id


def _config(flavour: str, shape: dict) -> dict:
    return {
        "architectures": [GEMMA3.causal_lm_architecture],
        "model_type": GEMMA3.text_model_type,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "attn_logit_softcapping": None,
        "final_logit_softcapping": None,
        "hidden_activation": "gelu_pytorch_tanh",
        "initializer_range": 0.02,
        "max_position_embeddings": 32768,
        "query_pre_attn_scalar": shape["head_dim"],
        "rms_norm_eps": 1e-6,
        "rope_local_base_freq": 10000.0,
        "rope_scaling": None,
        "rope_theta": 1000000.0,
        "sliding_window": 512,
        "sliding_window_pattern": 6,
        "use_cache": True,
        "pad_token_id": GEMMA3.pad_id,
        "bos_token_id": GEMMA3.bos_id,
        "eos_token_id": _eos(GEMMA3, flavour),
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
        **shape,
    }


def _weights(shape: dict, seed: int) -> dict[str, np.ndarray]:
    """Random weights under the HF parameter names of Gemma3ForCausalLM (tied embeddings)."""
    rng = np.random.default_rng(seed)
    hidden, inter = shape["hidden_size"], shape["intermediate_size"]
    q_out = shape["num_attention_heads"] * shape["head_dim"]
    kv_out = shape["num_key_value_heads"] * shape["head_dim"]

    def dense(rows, cols):
        return (rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float32)

    def norm(size):  # Gemma norms multiply by (1 + w); keep w small
        return (0.1 * rng.standard_normal(size)).astype(np.float32)

    # Modest embeddings (std 0.2): the untrained model starts near uniform (first loss a little above
    # ln(vocab)) yet logits can grow large enough for a trained tiny model to say real words.
    weights = {"model.embed_tokens.weight": (0.2 * rng.standard_normal((shape["vocab_size"], hidden))).astype(np.float32)}
    for i in range(shape["num_hidden_layers"]):
        p = f"model.layers.{i}"
        weights.update(
            {
                f"{p}.self_attn.q_proj.weight": dense(q_out, hidden),
                f"{p}.self_attn.k_proj.weight": dense(kv_out, hidden),
                f"{p}.self_attn.v_proj.weight": dense(kv_out, hidden),
                f"{p}.self_attn.o_proj.weight": dense(hidden, q_out),
                f"{p}.self_attn.q_norm.weight": norm(shape["head_dim"]),
                f"{p}.self_attn.k_norm.weight": norm(shape["head_dim"]),
                f"{p}.mlp.gate_proj.weight": dense(inter, hidden),
                f"{p}.mlp.up_proj.weight": dense(inter, hidden),
                f"{p}.mlp.down_proj.weight": dense(hidden, inter),
                f"{p}.input_layernorm.weight": norm(hidden),
                f"{p}.post_attention_layernorm.weight": norm(hidden),
                f"{p}.pre_feedforward_layernorm.weight": norm(hidden),
                f"{p}.post_feedforward_layernorm.weight": norm(hidden),
            }
        )
    weights["model.norm.weight"] = norm(hidden)
    return weights


def write_tiny_checkpoint(out_dir: Path, flavour: str = "pt", seed: int = 0, shape: dict | None = None) -> Path:
    """Write a tiny Gemma 3 checkpoint (`flavour` "pt" or "it") to `out_dir` and return it."""
    from safetensors.numpy import save_file

    if flavour not in ("pt", "it"):
        raise ValueError(f"flavour must be 'pt' or 'it', not {flavour!r}")
    shape = {**TINY_SHAPE, **(shape or {})}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    config = _config(flavour, shape)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(_weights(shape, seed), str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    _write_tokenizer_files(out_dir, GEMMA3, flavour, shape["vocab_size"], SPECIAL_TOKENS)
    return out_dir


def _write_tokenizer_files(out_dir: Path, family: Family, flavour: str, vocab_size: int, specials: list[str]) -> None:
    """generation_config.json, tokenizer.json, tokenizer_config.json and special_tokens_map.json of a tiny model."""
    generation = {"bos_token_id": family.bos_id, "eos_token_id": _eos(family, flavour), "pad_token_id": family.pad_id}
    if flavour == "it":
        generation.update(cache_implementation="hybrid", do_sample=True, top_k=64, top_p=0.95)
    (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    build_tokenizer(vocab_size=vocab_size, special_tokens=specials).save(str(out_dir / "tokenizer.json"))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": family.bos,
        "eos_token": family.turn_end if flavour == "it" else family.eos,
        "pad_token": family.pad,
        "unk_token": family.unk,
        "add_bos_token": True,
        "add_eos_token": False,
        "model_max_length": 32768,
        "padding_side": "left",
        "additional_special_tokens": [family.turn_start, family.turn_end],
    }
    if flavour == "it":
        tokenizer_config["chat_template"] = family.chat_template()
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    (out_dir / "special_tokens_map.json").write_text(
        json.dumps({k: tokenizer_config[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token")}, indent=2)
    )


def write_tiny_pair(root: Path, seed: int = 0) -> dict[str, Path]:
    """A base and an instruction-tuned tiny checkpoint, like google/gemma-3-1b-pt and -it."""
    root = Path(root)
    return {
        "tiny-gemma-3-pt": write_tiny_checkpoint(root / "tiny-gemma-3-pt", "pt", seed),
        "tiny-gemma-3-it": write_tiny_checkpoint(root / "tiny-gemma-3-it", "it", seed + 1),
    }


# ---------------------------------------------------------------------------- tiny GGUF files

def _sentencepiece_vocab(size: int) -> tuple[list[str], list[float], list[int]]:
    """A SentencePiece-style vocabulary as llama.cpp stores it: Gemma's special ids, byte pieces, words."""
    normal, control, unused, byte = 1, 3, 5, 6  # llama.cpp token types
    tokens, types = list(SPECIAL_TOKENS), [control] * len(SPECIAL_TOKENS)
    for i, token in enumerate(tokens):
        if token.startswith("<unused"):
            types[i] = unused
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [byte] * 256
    seen = set(tokens)
    pieces = list("\u2581abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.,!?'")
    for word in re.findall(r"[A-Za-z']+", tokenizer_corpus()):
        pieces += ["\u2581" + word, word]
    for piece in pieces:
        if len(tokens) < size and piece not in seen:
            seen.add(piece)
            tokens.append(piece)
            types.append(normal)
    while len(tokens) < size:
        tokens.append(f"<unused{len(tokens)}>")
        types.append(unused)
    scores = [0.0 if t != normal else -float(i) for i, t in enumerate(types)]
    return tokens[:size], scores[:size], types[:size]


def write_tiny_gguf(path: Path, flavour: str = "pt", seed: int = 0, quant: str = "F32",
                    architecture: str = GEMMA3.gguf_architecture, kind: str = "model") -> Path:
    """A tiny Gemma 3 model as a llama.cpp GGUF file, with the weights of write_tiny_checkpoint(seed).

    Norm weights are stored as (1 + w) and 2-D weights in `quant` ("F32", "F16" or "Q8_0"), as
    llama.cpp writes them. `architecture` and `kind` (general.type) exist to build wrong files.
    """
    import gguf

    from .formats.gguf_names import gguf_name

    shape = dict(TINY_SHAPE)
    weights = _weights(shape, seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_type(kind)
    writer.add_name(f"tiny-gemma-3-{flavour}")
    a = architecture
    writer.add_uint32(f"{a}.context_length", 32768)
    writer.add_uint32(f"{a}.embedding_length", shape["hidden_size"])
    writer.add_uint32(f"{a}.block_count", shape["num_hidden_layers"])
    writer.add_uint32(f"{a}.feed_forward_length", shape["intermediate_size"])
    writer.add_uint32(f"{a}.attention.head_count", shape["num_attention_heads"])
    writer.add_uint32(f"{a}.attention.head_count_kv", shape["num_key_value_heads"])
    writer.add_uint32(f"{a}.attention.key_length", shape["head_dim"])
    writer.add_uint32(f"{a}.attention.value_length", shape["head_dim"])
    writer.add_float32(f"{a}.attention.layer_norm_rms_epsilon", 1e-6)
    writer.add_float32(f"{a}.rope.freq_base", 1_000_000.0)
    writer.add_uint32(f"{a}.attention.sliding_window", 512)
    tokens, scores, types = _sentencepiece_vocab(shape["vocab_size"])
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(GEMMA3.bos_id)
    writer.add_eos_token_id(GEMMA3.eos_id)
    writer.add_unk_token_id(GEMMA3.unk_id)
    writer.add_pad_token_id(GEMMA3.pad_id)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(False)
    qtype = gguf.GGMLQuantizationType[quant]
    for name, value in weights.items():
        if name.endswith("norm.weight"):
            writer.add_tensor(gguf_name(name), (value + 1.0).astype(np.float32))
        elif quant == "F32":
            writer.add_tensor(gguf_name(name), value)
        elif quant == "F16":
            writer.add_tensor(gguf_name(name), value.astype(np.float16))
        else:
            writer.add_tensor(gguf_name(name), gguf.quants.quantize(value, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# ---------------------------------------------------------------- tiny Gemma 4 and multimodal Gemma 3

# Gemma 4's own parts, small: per-layer input embeddings (PLE), the last 2 layers reuse earlier
# layers' keys and values (and have a double-wide MLP), full-attention layers have a wider head.
TINY_GEMMA4_SHAPE = dict(
    hidden_size=64,
    num_hidden_layers=6,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=1,
    head_dim=16,
    global_head_dim=32,
    hidden_size_per_layer_input=8,
    num_kv_shared_layers=2,
    vocab_size=1024,
)
_GEMMA4_LAYER_TYPES = ["sliding_attention", "sliding_attention", "full_attention"] * 2


def _gemma4_config(flavour: str, shape: dict) -> dict:
    """config.json of a Gemma4ForCausalLM (the keys transformers 5 and mlx-lm's gemma4_text read)."""
    return {
        "architectures": [GEMMA4.causal_lm_architecture],
        "model_type": GEMMA4.text_model_type,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "attention_k_eq_v": False,
        "enable_moe_block": False,
        "final_logit_softcapping": 30.0,
        "hidden_activation": "gelu_pytorch_tanh",
        "initializer_range": 0.02,
        "layer_types": _GEMMA4_LAYER_TYPES[: shape["num_hidden_layers"]],
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {
            "full_attention": {"partial_rotary_factor": 0.25, "rope_theta": 1000000.0, "rope_type": "proportional"},
            "sliding_attention": {"rope_theta": 10000.0, "rope_type": "default"},
        },
        "sliding_window": 512,
        "tie_word_embeddings": True,
        "use_cache": True,
        "use_double_wide_mlp": True,
        "vocab_size_per_layer_input": shape["vocab_size"],
        "pad_token_id": GEMMA4.pad_id,
        "bos_token_id": GEMMA4.bos_id,
        "eos_token_id": _eos(GEMMA4, flavour),
        "torch_dtype": "float32",
        **shape,
    }


def _gemma4_weights(config: dict, seed: int) -> dict[str, np.ndarray]:
    """Random weights under Gemma4ForCausalLM's parameter names (tied embeddings; norms multiply by w)."""
    rng = np.random.default_rng(seed)
    hidden, layers, ple = config["hidden_size"], config["num_hidden_layers"], config["hidden_size_per_layer_input"]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    first_shared = layers - config["num_kv_shared_layers"]

    def dense(rows, cols):
        return (rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float32)

    def norm(size):
        return (1.0 + 0.1 * rng.standard_normal(size)).astype(np.float32)

    weights = {
        "model.embed_tokens.weight": (0.2 * rng.standard_normal((config["vocab_size"], hidden))).astype(np.float32),
        "model.embed_tokens_per_layer.weight": (0.2 * rng.standard_normal((config["vocab_size"], layers * ple))).astype(np.float32),
        "model.per_layer_model_projection.weight": dense(layers * ple, hidden),
        "model.per_layer_projection_norm.weight": norm(ple),
        "model.norm.weight": norm(hidden),
    }
    for i, kind in enumerate(config["layer_types"]):
        p = f"model.layers.{i}"
        head = config["global_head_dim"] if kind == "full_attention" else config["head_dim"]
        inter = config["intermediate_size"] * (2 if config["use_double_wide_mlp"] and i >= first_shared else 1)
        weights.update({
            f"{p}.layer_scalar": rng.uniform(0.5, 1.0, (1,)).astype(np.float32),
            f"{p}.self_attn.q_proj.weight": dense(heads * head, hidden),
            f"{p}.self_attn.q_norm.weight": norm(head),
            f"{p}.self_attn.o_proj.weight": dense(hidden, heads * head),
            f"{p}.mlp.gate_proj.weight": dense(inter, hidden),
            f"{p}.mlp.up_proj.weight": dense(inter, hidden),
            f"{p}.mlp.down_proj.weight": dense(hidden, inter),
            f"{p}.input_layernorm.weight": norm(hidden),
            f"{p}.post_attention_layernorm.weight": norm(hidden),
            f"{p}.pre_feedforward_layernorm.weight": norm(hidden),
            f"{p}.post_feedforward_layernorm.weight": norm(hidden),
            f"{p}.per_layer_input_gate.weight": dense(ple, hidden),
            f"{p}.per_layer_projection.weight": dense(hidden, ple),
            f"{p}.post_per_layer_input_norm.weight": norm(hidden),
        })
        if i < first_shared:  # KV-shared layers have no key/value projections of their own
            # keys are the values in the full-attention layers of a k-eq-v model (26B/31B): no v_proj there
            keys_are_values = config.get("attention_k_eq_v") and kind == "full_attention"
            kv = (config.get("num_global_key_value_heads") or kv_heads) if keys_are_values else kv_heads
            weights[f"{p}.self_attn.k_proj.weight"] = dense(kv * head, hidden)
            if not keys_are_values:
                weights[f"{p}.self_attn.v_proj.weight"] = dense(kv * head, hidden)
            weights[f"{p}.self_attn.k_norm.weight"] = norm(head)
    return weights


def write_tiny_gemma4_checkpoint(out_dir: Path, flavour: str = "pt", seed: int = 0) -> Path:
    """Write a tiny Gemma 4 text checkpoint (Gemma4ForCausalLM layout, `flavour` "pt" or "it") and return it."""
    from safetensors.numpy import save_file

    if flavour not in ("pt", "it"):
        raise ValueError(f"flavour must be 'pt' or 'it', not {flavour!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = _gemma4_config(flavour, dict(TINY_GEMMA4_SHAPE))
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(_gemma4_weights(config, seed), str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    _write_tokenizer_files(out_dir, GEMMA4, flavour, config["vocab_size"], GEMMA4_SPECIAL_TOKENS)
    return out_dir


def write_tiny_gemma4_pair(root: Path, seed: int = 0) -> dict[str, Path]:
    """A base and an instruction-tuned tiny Gemma 4, like google/gemma-4-E2B and -it."""
    root = Path(root)
    return {
        "tiny-gemma-4-pt": write_tiny_gemma4_checkpoint(root / "tiny-gemma-4-pt", "pt", seed),
        "tiny-gemma-4-it": write_tiny_gemma4_checkpoint(root / "tiny-gemma-4-it", "it", seed + 1),
    }


def write_tiny_multimodal_checkpoint(out_dir: Path, flavour: str = "it", seed: int = 0, family: str = GEMMA3.name) -> Path:
    """A tiny multimodal checkpoint (transformers 5 names): Gemma3ForConditionalGeneration, or with
    `family="gemma-4"` Gemma4ForConditionalGeneration, whose language model (write_tiny_checkpoint's or
    write_tiny_gemma4_checkpoint's, same seed) sits under `model.language_model.`, beside small
    vision (and for Gemma 4 audio) weights and a config whose text_config is sparse, as the hub writes it.

    Only the text half is real; the other weights are there to be left out by convert.
    """
    from safetensors.numpy import load_file, save_file

    gemma4 = family == GEMMA4.name
    writer = write_tiny_gemma4_checkpoint if gemma4 else write_tiny_checkpoint
    out_dir = Path(writer(out_dir, flavour, seed))
    text = json.loads((out_dir / "config.json").read_text())
    rng = np.random.default_rng(seed + 100)
    weights = {name.replace("model.", "model.language_model.", 1): value
               for name, value in load_file(str(out_dir / "model.safetensors")).items()}
    weights["model.vision_tower.patch_embedding.weight"] = rng.standard_normal((32, 3, 4, 4)).astype(np.float32)
    weights["model.multi_modal_projector.weight"] = rng.standard_normal((32, text["hidden_size"])).astype(np.float32)
    if gemma4:
        weights["model.audio_tower.subsample.weight"] = rng.standard_normal((8, 8)).astype(np.float32)
    save_file(weights, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    keep = [k for k in text if k not in ("architectures", "torch_dtype", "bos_token_id", "eos_token_id", "pad_token_id")]
    sparse = {k: text[k] for k in keep} if gemma4 else {
        k: text[k] for k in (*TINY_SHAPE, "model_type", "query_pre_attn_scalar", "sliding_window", "rope_scaling",
                             "rope_theta", "rope_local_base_freq")}
    owner = GEMMA4 if gemma4 else GEMMA3
    config = {
        "architectures": [owner.causal_lm_architecture.replace("ForCausalLM", "ForConditionalGeneration")],
        "model_type": owner.multimodal_model_types[0],
        "text_config": sparse,
        "vision_config": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64},
        "eos_token_id": text["eos_token_id"],
        "bos_token_id": text["bos_token_id"],
        "pad_token_id": text["pad_token_id"],
        "torch_dtype": "float32",
    }
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out_dir
