"""`gemma-mlx fuse`: fused == base + adapters, Gemma-correct output, manifests, re-runs, errors, HF export."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import gemma_mlx  # noqa: F401  (preloads BLAS before mlx.core)
import mlx.core as mx
from gemma_mlx.models import load as load_with_adapters
from gemma_mlx.cli import cli
from gemma_mlx.errors import OutputExistsError
from gemma_mlx.fuse import fuse_model
from gemma_mlx.manifest import read_manifest, write_manifest

TOKENS = [2, 105, 300, 301, 302, 106, 10, 105, 400, 500, 600]  # <bos><start_of_turn>... a mixed sequence
TURN_IDS = [105, 106]


def make_adapters(base: Path, out: Path, seed: int = 0, num_layers: int = 2, rank: int = 4, turn_tokens: bool = True) -> Path:
    """Hand-made trained adapters in the trainer's layout (independent of the trainer's speed).

    LoRA B starts at zero in mlx-lm, so a freshly wrapped model equals its base; we give A and B
    random values so the fused weights really differ from the base.
    """
    from mlx.utils import tree_flatten
    from mlx_lm import load
    from mlx_lm.tuner.utils import linear_to_lora_layers

    config = {"fine_tune_type": "lora", "num_layers": num_layers, "lora_parameters": {"rank": rank, "scale": 2.0, "dropout": 0.0}}
    model, _ = load(str(base))
    linear_to_lora_layers(model, num_layers, config["lora_parameters"])
    rng = np.random.default_rng(seed)
    leaves = {
        name: mx.array((0.1 * rng.standard_normal(value.shape)).astype(np.float32))
        for name, value in tree_flatten(model.parameters())
        if name.rsplit(".", 1)[-1] in ("lora_a", "lora_b")
    }
    out.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(out / "adapters.safetensors"), leaves)
    (out / "adapter_config.json").write_text(json.dumps({**config, "model": str(base)}))
    if turn_tokens:
        rows = mx.array(rng.standard_normal((2, 64)).astype(np.float32))
        mx.save_safetensors(str(out / "turn_tokens.safetensors"), {"ids": mx.array(TURN_IDS, dtype=mx.int32), "rows": rows})
    write_manifest(out, {"stage": "train", "run_name": "unit", "base_model": str(Path(base).resolve()), "base_manifest": read_manifest(base)})
    return out


def logits(model, tokens=TOKENS) -> np.ndarray:
    out = model(mx.array([tokens]))
    mx.eval(out)
    return np.array(out[0].astype(mx.float32))


@pytest.fixture(scope="module")
def adapters(converted_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    return make_adapters(converted_models["pt"], root / "unit" / "tiny-gemma-3-pt")


@pytest.fixture(scope="module")
def fused(adapters):
    """One fused model shared by the read-only tests (fusing is the slow part)."""
    return fuse_model(adapters)


def test_fused_logits_equal_base_plus_adapters(fused, adapters, converted_models):
    from mlx_lm import load

    assert fused.status == "fused"
    assert fused.out_dir == adapters / "fused"
    model_fused, _ = load(str(fused.out_dir))
    model_adapted, _ = load_with_adapters(converted_models["pt"], adapters)
    model_base, _ = load(str(converted_models["pt"]))
    expected = logits(model_adapted)
    got = logits(model_fused)
    assert np.abs(got - expected).max() < 1e-4
    # The adapters and the turn rows really changed the model (else the comparison proves nothing).
    assert np.abs(logits(model_base) - expected).max() > 1e-2
    rows = np.array(model_fused.model.embed_tokens.weight[mx.array(TURN_IDS)])
    saved = np.array(mx.load(str(adapters / "turn_tokens.safetensors"))["rows"])
    np.testing.assert_allclose(rows, saved, atol=1e-6)


def test_fused_dir_is_gemma_correct_and_documented(fused, adapters, converted_models):
    from mlx_lm import load, stream_generate

    out = fused.out_dir
    config = json.loads((out / "config.json").read_text())
    generation = json.loads((out / "generation_config.json").read_text())
    assert 106 in config["eos_token_id"] and 1 in config["eos_token_id"]
    assert 106 in generation["eos_token_id"]
    model, tokenizer = load(str(out))
    assert {1, 106} <= set(tokenizer.eos_token_ids)
    # mlx-lm's own generator stops on <end_of_turn> for this fused -pt model (a -pt base lists only <eos>).
    steps = []

    def end_turn_at_third_token(tokens, step_logits):
        # keep every stop token away for two steps, then force <end_of_turn>
        steps.append(1)
        vocab = mx.arange(step_logits.shape[-1])
        if len(steps) == 3:
            return step_logits + 1e4 * (vocab == 106)
        return step_logits - 1e4 * ((vocab == 106) | (vocab == 1))

    responses = list(stream_generate(model, tokenizer, [2, 105, 300], max_tokens=20, logits_processors=[end_turn_at_third_token]))
    assert responses[-1].finish_reason == "stop" and responses[-1].token == 106
    assert responses[-1].generation_tokens == 3
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert rendered.endswith("<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n")

    manifest = read_manifest(out)
    assert manifest == fused.manifest
    assert manifest["stage"] == "fuse"
    assert manifest["base_model"] == str(Path(converted_models["pt"]).resolve())
    assert manifest["adapters"] == str(adapters)
    assert manifest["train_manifest"]["run_name"] == "unit"
    assert manifest["flavour"] == "pt"
    assert manifest["fused_layers"] == 2 * 7  # 2 layers x (q, k, v, o, gate, up, down)
    assert manifest["turn_tokens_baked"] is True
    assert manifest["settings"]["dequantize"] is False
    assert set(manifest["inputs"]["adapters_sha256"]) == {"adapters.safetensors", "adapter_config.json", "turn_tokens.safetensors"}


def test_fused_model_is_gemma_correct_even_from_a_bare_base(adapters, converted_models, tmp_path):
    """A base with only <eos> as stop token and no template (like a raw -pt dir) still fuses to a correct model."""
    from mlx_lm import load

    bare = tmp_path / "bare-base"
    shutil.copytree(converted_models["pt"], bare, ignore=shutil.ignore_patterns("chat_template.jinja"))
    for name in ("config.json", "generation_config.json"):
        config = json.loads((bare / name).read_text())
        (bare / name).write_text(json.dumps({**config, "eos_token_id": 1}))
    tokenizer_config = json.loads((bare / "tokenizer_config.json").read_text())
    tokenizer_config.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    assert load(str(bare))[1].chat_template is None

    result = fuse_model(adapters, base=bare, out=tmp_path / "fused")
    assert json.loads((result.out_dir / "generation_config.json").read_text())["eos_token_id"] == [1, 106]
    _, tokenizer = load(str(result.out_dir))
    assert {1, 106} <= set(tokenizer.eos_token_ids) and "<start_of_turn>" in tokenizer.chat_template


def test_rerun_is_noop_and_force_needed_for_different_output(fused, adapters, tmp_path):
    weights = fused.out_dir / "model.safetensors"
    before = weights.stat().st_mtime_ns
    again = fuse_model(adapters)
    assert again.status == "up-to-date" and weights.stat().st_mtime_ns == before

    # Different adapters into the same output: refused without force, replaced with it.
    other = make_adapters(Path(fused.manifest["base_model"]), tmp_path / "other", seed=1, turn_tokens=False)
    with pytest.raises(OutputExistsError, match="--force"):
        fuse_model(other, out=fused.out_dir)
    assert weights.stat().st_mtime_ns == before
    replaced = fuse_model(other, out=tmp_path / "copy")
    assert replaced.status == "fused" and replaced.manifest["turn_tokens_baked"] is False
    forced = fuse_model(adapters, out=tmp_path / "copy", force=True)
    assert forced.status == "fused" and forced.manifest["adapters"] == str(adapters)


def test_cli_fuse_and_mismatch_errors(adapters, converted_models, tmp_path):
    runner = CliRunner()
    out = tmp_path / "cli-fused"
    result = runner.invoke(cli, ["fuse", str(adapters), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "fused" in result.output and (out / "model.safetensors").is_file()
    hf = tmp_path / "hf"
    result = runner.invoke(cli, ["fuse", str(adapters), "--out", str(out), "--export-hf", str(hf)])
    assert result.exit_code == 0, result.output
    assert f"up-to-date\t{out}" in result.output and f"hf-export\t{hf}" in result.output
    assert {"model.safetensors", "config.json", "tokenizer.json", "generation_config.json"} <= {p.name for p in hf.iterdir()}
    assert read_manifest(hf)["dtype"] == "float32"  # the fused model is float32
    exported = (hf / "model.safetensors").stat().st_mtime_ns
    result = runner.invoke(cli, ["fuse", str(adapters), "--out", str(out), "--export-hf", str(hf)])
    assert result.exit_code == 0 and (hf / "model.safetensors").stat().st_mtime_ns == exported
    result = runner.invoke(cli, ["fuse", str(adapters), "--out", str(out), "--export-hf", str(hf), "--hf-dtype", "bfloat16"])
    assert result.exit_code == 1 and "--force" in result.output and "Traceback" not in result.output

    def fails(args, *phrases):
        result = runner.invoke(cli, ["fuse", *map(str, args)])
        assert result.exit_code == 1, result.output
        assert "Traceback" not in result.output
        for phrase in phrases:
            assert phrase in result.output, result.output

    fails([tmp_path / "nope"], "does not exist")
    empty = tmp_path / "empty"
    empty.mkdir()
    fails([empty], "no adapters.safetensors", "train first")
    # Same shapes, but trained on the -pt model: fusing into -it would make a model nobody trained.
    fails([adapters, "--base", converted_models["it"], "--out", tmp_path / "x"], "different checkpoint", "the base the adapters were trained on")
    # Onto the fused model they are already in (or any fused model): applied twice, a model nobody trained.
    fails([adapters, "--base", out, "--out", tmp_path / "twice"], "a fused model (a base with adapters already in it)",
          "the base the adapters were trained on")
    assert not (tmp_path / "twice").exists()
    # Adapters for another architecture size: shapes do not fit.
    wrong = tmp_path / "wrong-shape"
    shutil.copytree(adapters, wrong, ignore=shutil.ignore_patterns("fused", "manifest.json"))
    mx.save_safetensors(str(wrong / "adapters.safetensors"), {
        "model.layers.5.self_attn.q_proj.lora_a": mx.zeros((128, 4)),
        "model.layers.5.self_attn.q_proj.lora_b": mx.zeros((4, 64)),
    })
    fails([wrong, "--base", converted_models["pt"]], "do not fit", "lora_a")
    # A base that is not a Gemma 3 text model.
    other_type = tmp_path / "other-type"
    shutil.copytree(converted_models["pt"], other_type)
    config = json.loads((other_type / "config.json").read_text())
    (other_type / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    fails([wrong, "--base", other_type], "model_type is 'llama'")
    # No manifest naming a base and no --base.
    bare = tmp_path / "bare"
    shutil.copytree(adapters, bare, ignore=shutil.ignore_patterns("fused", "manifest.json"))
    (bare / "adapter_config.json").write_text(json.dumps({"fine_tune_type": "lora", "num_layers": 2, "lora_parameters": {"rank": 4, "scale": 2.0, "dropout": 0.0}}))
    fails([bare], "--base")


def test_quantized_base_requantizes_unless_dequantize(tiny_checkpoints, tmp_path):
    from gemma_mlx.convert import convert_checkpoint
    from mlx_lm import load

    base = convert_checkpoint(str(tiny_checkpoints["pt"]), out=tmp_path / "q8", dtype="float32", quantize_bits=8).path
    adapter_dir = make_adapters(base, tmp_path / "run" / "q8")
    kept = fuse_model(adapter_dir, out=tmp_path / "fused-q8")
    flat = fuse_model(adapter_dir, out=tmp_path / "fused-f32", dequantize=True)
    assert "quantization" in json.loads((kept.out_dir / "config.json").read_text())
    assert "quantization" not in json.loads((flat.out_dir / "config.json").read_text())
    assert any(k.endswith(".scales") for k in mx.load(str(kept.out_dir / "model.safetensors")))
    assert not any(k.endswith(".scales") for k in mx.load(str(flat.out_dir / "model.safetensors")))
    assert kept.manifest["turn_tokens_baked"] and flat.manifest["turn_tokens_baked"]

    # Setting turn rows in a quantized embedding re-quantizes the whole table, while the de-quantized
    # fused model holds the rows exactly; so compare with the LoRA-only model away from the turn tokens.
    plain = [t for t in TOKENS if t not in TURN_IDS]
    others = [i for i in range(1024) if i not in TURN_IDS]
    expected = logits(load(str(base), adapter_path=str(adapter_dir))[0], plain)[:, others]
    model_flat = load(str(flat.out_dir))[0]
    assert np.abs(logits(model_flat, plain)[:, others] - expected).max() < 1e-4
    rows = np.array(model_flat.model.embed_tokens.weight[mx.array(TURN_IDS)])
    np.testing.assert_allclose(rows, np.array(mx.load(str(adapter_dir / "turn_tokens.safetensors"))["rows"]), atol=1e-6)
    # Re-quantizing the merged weights costs a little precision, not the model.
    got = logits(load(str(kept.out_dir))[0], plain)[:, others]
    assert np.abs(got - expected).max() < 0.05 * np.abs(expected).max()


# Logits here reach ~70; float32 agrees to ~1e-5, bfloat16 weights to ~0.1 (a wrong mapping is off by tens).
@pytest.mark.parametrize("dtype, tolerance", [("float32", 1e-3), ("bfloat16", 0.5)])
def test_hf_export_loads_in_transformers_with_matching_logits(fused, tmp_path, dtype, tolerance):
    import torch  # a test dependency (the [test] extra)
    from mlx_lm import load
    from transformers import AutoModelForCausalLM, AutoTokenizer

    export = tmp_path / f"hf-{dtype}"
    result = fuse_model(fused.manifest["adapters"], export_hf=export, hf_dtype=dtype)
    assert result.status == "up-to-date" and result.hf_dir == export
    config = json.loads((export / "config.json").read_text())
    assert config["model_type"] == "gemma3_text" and config["architectures"] == ["Gemma3ForCausalLM"]
    assert config["tie_word_embeddings"] is True and "quantization" not in config
    assert json.loads((export / "generation_config.json").read_text())["eos_token_id"] == [1, 106]

    hf_model = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        hf_logits = hf_model(torch.tensor([TOKENS])).logits[0].numpy()
    mlx_logits = logits(load(str(fused.out_dir))[0])
    assert hf_logits.shape == mlx_logits.shape
    assert np.abs(hf_logits - mlx_logits).max() < tolerance
    assert hf_model.generation_config.eos_token_id == [1, 106]
    hf_tokenizer = AutoTokenizer.from_pretrained(export)
    assert hf_tokenizer.convert_tokens_to_ids(["<start_of_turn>", "<end_of_turn>"]) == TURN_IDS
    # a class transformers 4 knows too (transformers 5 would write its own TokenizersBackend)
    assert json.loads((export / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"


def test_outputs_never_replace_the_adapters_or_the_base(adapters, converted_models):
    with pytest.raises(OutputExistsError, match="the base model"):
        fuse_model(adapters, out=converted_models["pt"], force=True)
    with pytest.raises(OutputExistsError, match="the adapters"):
        fuse_model(adapters, out=adapters.parent, force=True)
    with pytest.raises(OutputExistsError, match="the adapters"):
        fuse_model(adapters, export_hf=adapters, force=True)
    assert (adapters / "adapters.safetensors").is_file() and (converted_models["pt"] / "config.json").is_file()


def test_fuse_from_another_directory_finds_a_base_given_relative_to_training(converted_models, tmp_path, monkeypatch):
    from gemma_mlx.config import LoraSettings, TrainSettings
    from gemma_mlx.train import train_model

    from .test_train import write_chat_data

    work = tmp_path / "work"
    shutil.copytree(converted_models["pt"], work / "models" / "base")
    write_chat_data(work / "chat.jsonl", count=12)
    monkeypatch.chdir(work)  # train with relative paths, as a user in their project directory would
    train_model("models/base", "chat.jsonl", out=Path("run"), lora=LoraSettings(num_layers=1, rank=2),
                train=TrainSettings(epochs=1, val_generation_tokens=0))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    result = CliRunner().invoke(cli, ["fuse", str(work / "run")])
    assert result.exit_code == 0, result.output
    assert (work / "run" / "fused" / "model.safetensors").is_file()
    # moved away: the message says where the base was and how to point to it
    shutil.move(work / "models" / "base", tmp_path / "moved-base")
    result = CliRunner().invoke(cli, ["fuse", str(work / "run"), "--out", str(tmp_path / "f2")])
    assert result.exit_code == 1 and "is not there any more" in result.output and "--base" in result.output
    assert "gemma-mlx convert" not in result.output


def test_adapters_without_their_turn_rows_are_refused(adapters, converted_models, tmp_path):
    from gemma_mlx.errors import CheckpointError
    from gemma_mlx.generate import load_model

    copy = tmp_path / "no-rows"
    shutil.copytree(adapters, copy, ignore=shutil.ignore_patterns("fused"))
    config = json.loads((copy / "adapter_config.json").read_text())
    (copy / "adapter_config.json").write_text(json.dumps({**config, "turn_tokens_file": "turn_tokens.safetensors"}))
    (copy / "turn_tokens.safetensors").unlink()
    with pytest.raises(CheckpointError, match="turn_tokens.safetensors is missing"):
        load_model(f"{converted_models['pt']}::{copy}")
