"""Gemma 4 and multimodal Gemma 3 checkpoints: tiny ones through convert, the turn format, train, fuse,
compare, chat and the Hugging Face export, with logits checked against transformers."""

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from gemma_mlx.cli import cli
from gemma_mlx.families import GEMMA3, GEMMA4
from gemma_mlx.tiny import write_tiny_checkpoint, write_tiny_gemma4_pair, write_tiny_multimodal_checkpoint

from .test_run import assert_only_the_calibrated_end_row

PROMPT_IDS = [2, 105, 300, 400, 500, 106, 600, 10, 20, 30, 700, 105, 41]


def run_cli(*args, **kwargs):
    result = CliRunner().invoke(cli, [str(a) for a in args], **kwargs)
    assert "Traceback" not in result.output, result.output
    return result


@pytest.fixture(scope="module")
def gemma4(tmp_path_factory):
    """{"pt": hf dir, "it": hf dir, "mlx-pt": converted, "mlx-it": converted}: a tiny Gemma 4 pair."""
    from gemma_mlx.convert import convert_checkpoint

    root = tmp_path_factory.mktemp("gemma4")
    pair = write_tiny_gemma4_pair(root / "hf")
    found = {"pt": pair["tiny-gemma-4-pt"], "it": pair["tiny-gemma-4-it"]}
    for flavour in ("pt", "it"):
        found[f"mlx-{flavour}"] = convert_checkpoint(str(found[flavour]), out=root / f"mlx-{flavour}", dtype="float32").path
    return found


def mlx_logits(model_dir: Path, ids=PROMPT_IDS) -> np.ndarray:
    import mlx.core as mx
    from mlx_lm import load

    model, _ = load(str(model_dir))
    return np.array(model(mx.array([ids])).astype(mx.float32))[0]


def transformers_logits(hf_dir: Path, ids=PROMPT_IDS) -> np.ndarray:
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32)
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def test_converted_gemma4_logits_match_transformers(gemma4):
    reference = transformers_logits(gemma4["pt"])
    ours = mlx_logits(gemma4["mlx-pt"])
    assert np.abs(reference).max() > 1.0  # not a model that says nothing
    np.testing.assert_allclose(ours, reference, atol=2e-4, rtol=1e-4)


def test_gemma4_turn_format_and_stops(gemma4):
    from mlx_lm import load

    from gemma_mlx.chat_format import prompt_ids, reply_end_token_ids
    from gemma_mlx.families import family_of_tokenizer

    _, tokenizer = load(str(gemma4["mlx-it"]))
    assert family_of_tokenizer(tokenizer) is GEMMA4
    ids = prompt_ids(tokenizer, [{"role": "system", "content": "Be Bluey."}, {"role": "user", "content": "hi"}])
    assert ids[:2] == [GEMMA4.bos_id, GEMMA4.turn_start_id]  # <bos><|turn>, each one token
    assert ids.count(GEMMA4.turn_start_id) == 3 and ids.count(GEMMA4.turn_end_id) == 2  # system, user, open model turn
    text = tokenizer.decode(ids)
    assert text.startswith("<bos><|turn>system\nBe Bluey.<turn|>\n<|turn>user\nhi<turn|>\n<|turn>model\n"), text
    ends = reply_end_token_ids(tokenizer)
    think, channel_open, channel_close = (tokenizer.convert_tokens_to_ids(t)
                                          for t in (GEMMA4.think, GEMMA4.channel_open, GEMMA4.channel_close))
    assert {GEMMA4.eos_id, GEMMA4.turn_end_id, think} <= ends  # the thinking switch is never a reply's word
    assert not {channel_open, channel_close} & ends  # a thought channel is no end: the answer follows it
    assert GEMMA4.bos_id in ends and not {500, 600, 700} & ends  # ordinary words go on


def test_gemma4_convert_records_the_family_and_the_flavour_evidence(gemma4):
    for flavour in ("pt", "it"):
        directory = gemma4[f"mlx-{flavour}"]
        manifest = json.loads((directory / "manifest.json").read_text())
        assert manifest["flavour"] == flavour and manifest["model_type"] == "gemma4_text"
        assert "cosine(<turn|>, mean <unusedN>)" in manifest["flavour_evidence"]["explanation"]
        config = json.loads((directory / "config.json").read_text())
        assert GEMMA4.turn_end_id in config["eos_token_id"] and GEMMA4.eos_id in config["eos_token_id"]
        jinja = directory / "chat_template.jinja"
        template = jinja.read_text() if jinja.is_file() else json.loads((directory / "tokenizer_config.json").read_text())["chat_template"]
        assert "<|turn>" in template and "<start_of_turn>" not in template


def test_tiny_family_option_builds_the_gemma4_pair(isolated_outputs):
    result = run_cli("run", "--tiny", "--tiny-family", "gemma-4", "--only", "convert")
    assert result.exit_code == 0, result.output
    models = isolated_outputs / "runs" / "tiny-gemma-4" / "models"
    assert sorted(p.name for p in models.iterdir()) == ["tiny-gemma-4-it", "tiny-gemma-4-pt"]


@pytest.mark.pipeline
def test_gemma4_pair_runs_the_whole_experiment(isolated_outputs, tmp_path):
    """`run` on the tiny Gemma 4 pair (as --tiny --tiny-family gemma-4 makes it, with fewer prompts):
    convert, data, train (the base's turn rows too), fuse, compare; then chat and --export-hf."""
    from gemma_mlx.config import apply_overrides
    from gemma_mlx.run import run_experiment, tiny_config

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("What should I do today?\nTell me about your family.\n")
    config = apply_overrides(tiny_config(family="gemma-4"), {"train.epochs": 1, "generation.max_tokens": 8,
                                                            "train.val_generation_tokens": 8, "prompts": [str(prompts)]})
    result = run_experiment(config)
    run_dir = isolated_outputs / "runs" / "tiny-gemma-4"
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert [(s["stage"], s["status"]) for s in manifest["stages"]] == [
        ("convert", "ran"), ("data", "ran"), ("train", "ran"), ("fuse", "ran"), ("compare", "ran")], result
    base_adapters = run_dir / "tiny-gemma-4-pt"
    assert (base_adapters / "turn_tokens.safetensors").is_file()  # the base's <|turn>/<turn|> rows were trained
    assert_only_the_calibrated_end_row(run_dir / "tiny-gemma-4-it", GEMMA4.turn_end_id)
    replies = [json.loads(line) for line in (run_dir / "compare" / "replies.jsonl").read_text().splitlines()]
    assert len({r["model"] for r in replies}) == 4 and len(replies) == 8
    assert all("<turn|>" not in r["text"] and "<|turn>" not in r["text"] for r in replies)
    assert all(r["stop_token"] for r in replies if r["finish_reason"] == "stop")  # whatever ended a reply is named

    fused = base_adapters / "fused"
    chat = run_cli("chat", fused, "--max-tokens", "6", input="Hello there\n")
    assert chat.exit_code == 0 and chat.output.strip(), chat.output

    exported = isolated_outputs / "hf-gemma4"
    export = run_cli("fuse", base_adapters, "--export-hf", exported)
    assert export.exit_code == 0, export.output
    config = json.loads((exported / "config.json").read_text())
    assert config["architectures"] == ["Gemma4ForCausalLM"] and config["eos_token_id"][:2] == [1, 106]
    np.testing.assert_allclose(transformers_logits(exported), mlx_logits(fused), atol=3e-4, rtol=1e-4)


def test_gguf_export_of_gemma4_says_what_to_do_instead(gemma4, tmp_path):
    result = run_cli("export", gemma4["mlx-pt"], "--gguf", tmp_path / "gguf")
    assert result.exit_code != 0
    assert "gemma4_text" in result.output and "--export-hf" in result.output


# --- Gemma 3 multimodal (4B and up): the language model alone -------------------------------


def test_multimodal_gemma3_converts_to_its_language_model(tmp_path):
    multimodal = write_tiny_multimodal_checkpoint(tmp_path / "tiny-gemma-3-4b-it", "it", seed=5)
    text = write_tiny_checkpoint(tmp_path / "tiny-gemma-3-text-it", "it", seed=5)  # the same language model
    result = run_cli("convert", multimodal, "--out", tmp_path / "mlx", "--dtype", "float32")
    assert result.exit_code == 0, result.output
    assert "keeping its language model only" in result.output
    manifest = json.loads((tmp_path / "mlx" / "manifest.json").read_text())
    assert manifest["model_type"] == GEMMA3.text_model_type and manifest["source_model_type"] == "gemma3"
    assert manifest["language_model"]["dropped_tensors"] == 2 and manifest["language_model"]["kept_tensors"] > 50
    assert manifest["shape"]["hidden_size"] == 64
    weights = [json.loads((tmp_path / "mlx" / "config.json").read_text())["model_type"]]
    assert weights == ["gemma3_text"]
    np.testing.assert_allclose(mlx_logits(tmp_path / "mlx"), transformers_logits(text), atol=2e-4, rtol=1e-4)


def test_multimodal_language_model_trains(tmp_path, isolated_outputs):
    multimodal = write_tiny_multimodal_checkpoint(tmp_path / "tiny-gemma-3-4b-pt", "pt", seed=2)
    assert run_cli("convert", multimodal, "--out", tmp_path / "mlx", "--dtype", "float32").exit_code == 0
    data = Path(__file__).resolve().parents[1] / "data" / "bluey"
    result = run_cli("train", "--model", tmp_path / "mlx", "--data", data, "--epochs", "1", "--out", tmp_path / "adapters",
                     "--batch-size", "16", "--val-generation-tokens", "0", "--max-seq-length", "96")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "adapters" / "adapters.safetensors").is_file()
    assert (tmp_path / "adapters" / "turn_tokens.safetensors").is_file()  # a base: its turn rows trained too


def test_multimodal_gemma4_converts_to_its_language_model(tmp_path):
    """The hub's Gemma 4 E2B/E4B are Gemma4ForConditionalGeneration (vision and audio towers)."""
    multimodal = write_tiny_multimodal_checkpoint(tmp_path / "tiny-gemma-4-e2b", "pt", seed=7, family="gemma-4")
    text = write_tiny_gemma4_pair(tmp_path / "text", seed=7)["tiny-gemma-4-pt"]  # the same language model
    result = run_cli("convert", multimodal, "--out", tmp_path / "mlx", "--dtype", "float32")
    assert result.exit_code == 0, result.output
    assert "multimodal Gemma 4 checkpoint" in result.output
    manifest = json.loads((tmp_path / "mlx" / "manifest.json").read_text())
    assert manifest["model_type"] == "gemma4_text" and manifest["language_model"]["dropped_tensors"] == 3
    assert manifest["flavour"] == "pt"
    np.testing.assert_allclose(mlx_logits(tmp_path / "mlx"), transformers_logits(text), atol=2e-4, rtol=1e-4)


def test_run_reads_a_multimodal_checkpoint_by_its_language_model(tmp_path):
    """`run` checks settings and memory against the model convert will write, before any download."""
    from gemma_mlx.convert import check_reachable, resolve_source
    from gemma_mlx.sizing import parameter_count

    multimodal = write_tiny_multimodal_checkpoint(tmp_path / "mm", "it", seed=3, family="gemma-4")
    config = check_reachable(resolve_source(str(multimodal)))
    assert config["model_type"] == "gemma4_text" and config["num_hidden_layers"] == 6
    assert config["global_head_dim"] == 32  # what mlx-lm reads for the wide full-attention heads
    text = write_tiny_gemma4_pair(tmp_path / "text", seed=3)["tiny-gemma-4-pt"]
    assert parameter_count(config) == parameter_count(json.loads((text / "config.json").read_text()))
