"""`gemma-mlx export`: GGUF files llama.cpp loads and decodes as we do, Ollama's Modelfile, the stage rules.

The models are tiny Gemma 3 checkpoints converted from a tiny GGUF file, so they carry a
SentencePiece vocabulary as real Gemma models do; llama.cpp is the PyPI `llama-cpp-python`.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from gemma_mlx.chat_format import END_OF_TURN_ID, prompt_ids
from gemma_mlx.cli import cli
from gemma_mlx.manifest import read_manifest
from gemma_mlx.tiny import write_tiny_gguf

PROMPTS = ["Hello! Who are you?", "What game should we play?", "Tell me about your sister.", "Why is the sky blue?"]


def run_cli(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert "Traceback" not in result.output, result.output
    return result


@pytest.fixture(scope="module")
def gguf_model(tmp_path_factory):
    """A tiny -pt model converted from a tiny GGUF file (float32 MLX dir)."""
    from gemma_mlx.convert import convert_checkpoint

    root = tmp_path_factory.mktemp("export-src")
    source = write_tiny_gguf(root / "tiny-gemma-3-pt.gguf", flavour="pt", seed=3)
    return convert_checkpoint(str(source), out=root / "tiny-gemma-3-pt", dtype="float32").path


@pytest.fixture(scope="module")
def trained(gguf_model, tmp_path_factory):
    """Adapters of a short -pt run on the tiny GGUF model (turn-token rows trained) and their fused model."""
    from gemma_mlx.config import LoraSettings, TrainSettings
    from gemma_mlx.fuse import fuse_model
    from gemma_mlx.train import train_model
    from tests.test_train import write_chat_data

    root = tmp_path_factory.mktemp("export-run")
    data = write_chat_data(root / "chat.jsonl", count=16)
    run = train_model(gguf_model, data, out=root / "run" / "pt", lora=LoraSettings(num_layers=4, rank=4),
                      train=TrainSettings(epochs=1, batch_size=8, learning_rate=2e-3, val_generation_tokens=0))
    return run.out_dir, fuse_model(run.out_dir).out_dir


def greedy_mlx(model_dir: Path, prompt: str, count: int = 16, adapters: Path | None = None) -> list[int]:
    import mlx.core as mx

    from gemma_mlx.models import load

    model, tokenizer = load(model_dir, adapters)
    ids = prompt_ids(tokenizer, [{"role": "user", "content": prompt}])
    out = []
    for _ in range(count):
        token = int(mx.argmax(model(mx.array([ids + out]))[0, -1]).item())
        out.append(token)
    return out


def llama_cpp(gguf_file: Path):
    from llama_cpp import Llama

    return Llama(model_path=str(gguf_file), n_ctx=256, verbose=False)


def greedy_llama_cpp(llm, ids: list[int], count: int = 16) -> list[int]:
    llm.reset()
    out = []
    for token in llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0):
        out.append(int(token))
        if len(out) == count:
            break
    return out


def test_llama_cpp_decodes_the_export_as_we_do(gguf_model, tmp_path):
    from gemma_mlx.models import load

    result = run_cli("export", gguf_model, "--gguf", tmp_path / "bluey")
    assert result.exit_code == 0, result.output
    gguf_file = tmp_path / "bluey" / "bluey-f16.gguf"
    assert gguf_file.is_file() and f"exported\t{gguf_file}" in result.output
    _, tokenizer = load(gguf_model)
    llm = llama_cpp(gguf_file)
    agree = 0
    for prompt in PROMPTS:
        ids = prompt_ids(tokenizer, [{"role": "user", "content": prompt}])
        # llama.cpp's own tokenizer reads the written vocabulary the same way ours does
        assert llm.tokenize(tokenizer.decode(ids).encode(), add_bos=False, special=True) == ids
        agree += greedy_llama_cpp(llm, ids) == greedy_mlx(gguf_model, prompt)
    assert agree >= 3, f"greedy tokens agreed on {agree} of {len(PROMPTS)} prompts"
    assert llm.metadata["general.architecture"] == "gemma3"
    assert llm.metadata["tokenizer.ggml.eot_token_id"] == str(END_OF_TURN_ID)
    assert "<start_of_turn>model" in llm.metadata["tokenizer.chat_template"]


def test_export_ends_turns_and_says_how_to_run_it(gguf_model, tmp_path):
    import llama_cpp as raw

    assert run_cli("export", gguf_model, "--gguf", tmp_path / "e").exit_code == 0
    llm = llama_cpp(tmp_path / "e" / "e-f16.gguf")
    vocab = raw.llama_model_get_vocab(llm.model)
    assert raw.llama_vocab_is_eog(vocab, END_OF_TURN_ID) and raw.llama_vocab_is_eog(vocab, 1)
    modelfile = (tmp_path / "e" / "Modelfile").read_text()
    assert "FROM ./e-f16.gguf" in modelfile and 'PARAMETER stop "<end_of_turn>"' in modelfile
    assert "PARAMETER temperature 0" in modelfile and "PARAMETER repeat_penalty 1.1" in modelfile
    assert "<start_of_turn>user" in modelfile and "<start_of_turn>model" in modelfile
    card = (tmp_path / "e" / "README.md").read_text()
    assert "Gemma Terms of Use" in card and "ollama create" in card
    manifest = json.loads((tmp_path / "e" / "manifest.json").read_text())
    assert manifest["stage"] == "export" and manifest["quant"] == "f16"
    assert manifest["size_bytes"] == (tmp_path / "e" / "e-f16.gguf").stat().st_size
    assert manifest["tensor_types"] == {"F16": 43, "F32": 37}


def test_our_convert_reads_the_export_back(gguf_model, tmp_path):
    import mlx.core as mx
    from mlx_lm import load

    assert run_cli("export", gguf_model, "--gguf", tmp_path / "x", "--quant", "f16").exit_code == 0
    back = tmp_path / "back"
    assert run_cli("convert", tmp_path / "x" / "x-f16.gguf", "--out", back, "--dtype", "float32").exit_code == 0
    ids = mx.array([[2, 105, 300, 410, 77, 512, 106, 107, 105, 600]])
    source, _ = load(str(gguf_model))
    again, _ = load(str(back))
    expected, ours = np.array(source(ids)[0]), np.array(again(ids)[0])
    assert (expected.argmax(-1) == ours.argmax(-1)).all()
    np.testing.assert_allclose(ours, expected, atol=2e-2)  # float16 weights
    assert json.loads((back / "manifest.json").read_text())["flavour"] == "pt"


@pytest.mark.parametrize("quant, types", [("q8_0", {"Q8_0": 43, "F32": 37}),
                                          ("q4_0", {"Q4_0": 42, "Q8_0": 1, "F32": 37})])
def test_quantized_exports_load_and_decode(gguf_model, tmp_path, quant, types):
    assert run_cli("export", gguf_model, "--gguf", tmp_path / "q", "--quant", quant).exit_code == 0
    manifest = json.loads((tmp_path / "q" / "manifest.json").read_text())
    assert manifest["tensor_types"] == types
    llm = llama_cpp(tmp_path / "q" / manifest["file"])
    assert len(greedy_llama_cpp(llm, [2, 105, 300, 410], count=4)) == 4


def test_adapters_export_like_their_fused_model(trained, tmp_path):
    import gguf

    adapters, fused = trained
    base = json.loads((adapters / "adapter_config.json").read_text())["model"]
    assert run_cli("export", f"{base}::{adapters}", "--gguf", tmp_path / "a", "--quant", "f32").exit_code == 0
    assert run_cli("export", fused, "--gguf", tmp_path / "f", "--quant", "f32").exit_code == 0
    on_the_fly = {t.name: np.array(t.data) for t in gguf.GGUFReader(str(tmp_path / "a" / "a-f32.gguf")).tensors}
    from_fused = {t.name: np.array(t.data) for t in gguf.GGUFReader(str(tmp_path / "f" / "f-f32.gguf")).tensors}
    assert on_the_fly.keys() == from_fused.keys()
    for name in on_the_fly:
        np.testing.assert_allclose(on_the_fly[name], from_fused[name], atol=1e-5, err_msg=name)
    card = (tmp_path / "f" / "README.md").read_text()
    assert "1 epoch, " in card and "training conversations" in card  # the recipe, from the run's manifest


def test_export_rules(gguf_model, tmp_path):
    out = tmp_path / "rules"
    assert run_cli("export", gguf_model, "--gguf", out).exit_code == 0
    again = run_cli("export", gguf_model, "--gguf", out)
    assert again.exit_code == 0 and "up-to-date" in again.output
    other = run_cli("export", gguf_model, "--gguf", out, "--quant", "q8_0")
    assert other.exit_code == 1 and "--force" in other.output
    assert run_cli("export", gguf_model, "--gguf", out, "--quant", "q8_0", "--force").exit_code == 0
    onto_input = run_cli("export", gguf_model, "--gguf", gguf_model)
    assert onto_input.exit_code == 1 and "the model it exports" in onto_input.output
    assert (gguf_model / "model.safetensors").is_file()
    assert run_cli("export", gguf_model).exit_code == 1


def test_a_byte_level_tokenizer_is_refused_before_any_work(converted_models, tmp_path):
    result = run_cli("export", converted_models["pt"], "--gguf", tmp_path / "bad")
    assert result.exit_code == 1 and "SentencePiece" in result.output
    assert not (tmp_path / "bad").exists()


def test_the_exported_page_answers_in_chromium_as_the_fused_model_does(trained, tmp_path):
    """`export FUSED --web DIR`: the persona's own page, served by `gemma-mlx web`'s server, in Chromium."""
    from urllib.parse import quote

    from playwright.sync_api import sync_playwright

    from gemma_mlx.web import serve_in_thread
    from tests.test_web import BROWSER_ARGS, CHROMIUM, Tab, same_as_greedy

    _, fused = trained
    result = run_cli("export", fused, "--web", tmp_path / "page", "--quant", "f32")
    assert result.exit_code == 0, result.output
    settings = json.loads((tmp_path / "page" / "settings.json").read_text())
    assert settings["repeat_penalty"] == 1.1 and settings["temperature"] == 0.0
    assert (tmp_path / "page" / "model.gguf").is_file() and (tmp_path / "page" / "index.html").is_file()
    url, shutdown = serve_in_thread(tmp_path / "page")
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
            tab = Tab(browser, url)
            prompt = "Hello"
            # plain greedy, as greedy_mlx decodes: temperature 0 and the run's repeat penalty turned off
            tab.page.goto(f"{url}index.html?prompt={quote(prompt)}&max_tokens=16&temperature=0&repeat_penalty=1")
            reply = tab.reply()
            same_as_greedy(reply, greedy_mlx(fused, prompt), 16)
            assert tab.outside == []
            browser.close()
    finally:
        shutdown()


@pytest.mark.pipeline
def test_run_exports_each_fused_model(tmp_path, isolated_outputs):
    """`export: [gguf, web]` in the experiment YAML: each fused model is exported after the comparison."""
    gguf_file = write_tiny_gguf(tmp_path / "tiny-gemma-3-pt.gguf", flavour="pt", seed=5)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("What is your favourite game?\nTell me about your day.\n")
    config = tmp_path / "exp.yaml"
    config.write_text(
        f"name: exported\ncheckpoints: [{gguf_file}]\ndtype: float32\nprompts: [{prompts}]\n"
        "export: [gguf, web]\ntrain:\n  epochs: 1\n  batch_size: 16\n  val_generation_tokens: 0\n"
        "generation:\n  max_tokens: 8\n")
    result = run_cli("run", config)
    assert result.exit_code == 0, result.output
    checkpoint = isolated_outputs / "runs" / "exported" / "tiny-gemma-3-pt"
    assert (checkpoint / "export" / "export-q8_0.gguf").is_file() and (checkpoint / "export" / "Modelfile").is_file()
    assert (checkpoint / "web" / "model.gguf").is_file() and (checkpoint / "web" / "index.html").is_file()
    assert f"Export: tiny-gemma-3-pt: {checkpoint / 'export' / 'export-q8_0.gguf'}" in result.output
    card = (checkpoint / "export" / "README.md").read_text()
    assert "How it did" in card  # the run's scorecard figures reach the model card
    again = run_cli("run", config)
    assert again.exit_code == 0 and "export   up-to-date" in again.output
    bad = tmp_path / "bad.yaml"
    bad.write_text(config.read_text().replace("export: [gguf, web]", "export: [onnx]"))
    refused = run_cli("run", bad)
    assert refused.exit_code == 1 and "export" in refused.output and "gguf" in refused.output


def test_a_page_without_its_runtime_says_how_to_fetch_it_before_any_work(gguf_model, tmp_path, monkeypatch):
    import gemma_mlx.web as web

    monkeypatch.setattr(web, "RUNTIME_FILES", ("vendor/wllama/not-fetched.wasm",))
    result = run_cli("export", gguf_model, "--web", tmp_path / "page")
    assert result.exit_code == 1 and "scripts/vendor_wllama.sh" in result.output
    assert not (tmp_path / "page").exists()


def test_a_web_folder_that_cannot_be_written_is_refused_before_the_gguf_work(gguf_model, trained, tmp_path, isolated_outputs):
    """The page's folder is checked first: a user's folder, the GGUF folder itself, or another model's page
    (without --force) leave no GGUF export behind; a page alone keeps its GGUF in outputs/export/ under a
    name that another model with the same folder name cannot take."""
    _, fused = trained
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    result = run_cli("export", gguf_model, "--gguf", tmp_path / "g1", "--web", mine)
    assert result.exit_code == 1 and "did not write" in result.output
    assert not (tmp_path / "g1").exists() and (mine / "notes.txt").read_text() == "keep me"
    result = run_cli("export", gguf_model, "--gguf", tmp_path / "both", "--web", tmp_path / "both")
    assert result.exit_code == 1 and "would overlap" in result.output and not (tmp_path / "both").exists()

    page = tmp_path / "page"
    assert run_cli("export", gguf_model, "--web", page).exit_code == 0
    internal = read_manifest(page)["gguf_export"]
    assert Path(internal).parent == isolated_outputs / "export" and Path(internal).name.startswith(f"{gguf_model.name}-q8_0-")
    again = run_cli("export", gguf_model, "--web", page)
    assert again.exit_code == 0 and "up to date" in again.output
    other = run_cli("export", fused, "--gguf", tmp_path / "g2", "--web", page)  # another model's page there
    assert other.exit_code == 1 and "the page of another export" in other.output and "--force" in other.output
    assert not (tmp_path / "g2").exists()
    # another model in a folder of the same name gets its own internal GGUF folder
    twin = tmp_path / "elsewhere" / gguf_model.name
    shutil.copytree(fused, twin)
    assert run_cli("export", twin, "--web", tmp_path / "page2").exit_code == 0
    assert read_manifest(tmp_path / "page2")["gguf_export"] != internal
