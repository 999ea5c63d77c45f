"""`gemma-mlx convert FILE.gguf` on tiny GGUF files, and base/instruct told from the weights."""

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from gemma_mlx.cli import cli
from gemma_mlx.tiny import write_tiny_checkpoint, write_tiny_gguf

TOKENS = [2, 105, 300, 410, 77, 512, 106, 107, 105, 600]


def run_cli(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert "Traceback" not in result.output, result.output
    return result


def logits(model_dir: Path) -> np.ndarray:
    import mlx.core as mx
    from mlx_lm import load

    model, _ = load(str(model_dir))
    return np.array(model(mx.array([TOKENS]))[0].astype(mx.float32))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The tiny -pt checkpoint (seed 0) converted from Hugging Face format: what a GGUF of it must match."""
    from gemma_mlx.convert import convert_checkpoint

    root = tmp_path_factory.mktemp("gguf-ref")
    hf = write_tiny_checkpoint(root / "hf", "pt", seed=0)
    return convert_checkpoint(str(hf), out=root / "mlx", dtype="float32").path


def test_float_gguf_converts_to_the_same_model(reference, tmp_path):
    gguf_file = write_tiny_gguf(tmp_path / "tiny-gemma-3.gguf", quant="F32")
    out = tmp_path / "converted"
    result = run_cli("convert", gguf_file, "--out", out)
    assert result.exit_code == 0, result.output
    # names mapped, dims reversed, the (1 + w) norms undone: the logits agree to float32 rounding
    np.testing.assert_allclose(logits(out), logits(reference), atol=1e-5)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source"]["format"] == "gguf"
    assert manifest["source_id"]["sha256"] and len(manifest["source_id"]["sha256"]) == 64
    assert manifest["gguf"]["tensor_types"] == {"F32": 80}
    for name in ("config.json", "generation_config.json"):
        assert json.loads((out / name).read_text())["eos_token_id"] == [1, 106]
    assert "chat_template" in json.loads((out / "tokenizer_config.json").read_text())
    assert not (out / "hf").exists(), "the staged Hugging Face checkpoint must not stay in the model dir"


def test_quantized_gguf_is_dequantized(reference, tmp_path):
    gguf_file = write_tiny_gguf(tmp_path / "q8.gguf", quant="Q8_0")
    out = tmp_path / "q8"
    assert run_cli("convert", gguf_file, "--out", out).exit_code == 0
    ours, expected = logits(out), logits(reference)
    assert (ours.argmax(-1) == expected.argmax(-1)).all()
    np.testing.assert_allclose(ours, expected, atol=0.3)  # Q8_0 rounds each weight to 8 bits
    assert json.loads((out / "manifest.json").read_text())["gguf"]["tensor_types"] == {"Q8_0": 43, "F32": 37}  # 6 x 7 projections + embedding; norms stay F32


def test_gguf_tokenizer_keeps_turn_tokens_whole(tmp_path):
    from mlx_lm import load

    out = tmp_path / "m"
    assert run_cli("convert", write_tiny_gguf(tmp_path / "t.gguf"), "--out", out).exit_code == 0
    _, tokenizer = load(str(out))
    ids = tokenizer.encode("<start_of_turn>user\nHooray!<end_of_turn>", add_special_tokens=False)
    assert ids[0] == 105 and ids[-1] == 106
    assert tokenizer.decode(ids) == "<start_of_turn>user\nHooray!<end_of_turn>"


def test_gguf_rerun_is_a_no_op_and_flavour_override_needs_force(tmp_path):
    gguf_file = write_tiny_gguf(tmp_path / "t.gguf")
    out = tmp_path / "m"
    assert run_cli("convert", gguf_file, "--out", out).exit_code == 0
    before = (out / "model.safetensors").stat().st_mtime_ns
    again = run_cli("convert", gguf_file, "--out", out)
    assert again.exit_code == 0 and "up-to-date" in again.output
    assert (out / "model.safetensors").stat().st_mtime_ns == before
    refused = run_cli("convert", gguf_file, "--out", out, "--flavour", "it")
    assert refused.exit_code == 1 and "--force" in refused.output
    forced = run_cli("convert", gguf_file, "--out", out, "--flavour", "it", "--force")
    assert forced.exit_code == 0, forced.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["flavour"] == "it" and manifest["flavour_evidence"]["decided_by"] == "override"


@pytest.mark.parametrize("make, expected", [
    (lambda p: p.write_text("not a model"), "not a GGUF model file"),
    (lambda p: write_tiny_gguf(p, architecture="llama"), "holds a 'llama' model"),
    (lambda p: write_tiny_gguf(p, architecture="clip", kind="mmproj"), "multimodal projector"),
])
def test_gguf_errors(tmp_path, make, expected):
    path = tmp_path / "bad.gguf"
    make(path)
    result = run_cli("convert", path, "--out", tmp_path / "out")
    assert result.exit_code == 1
    assert expected in result.output
    assert not (tmp_path / "out").exists()


def test_truncated_gguf_is_one_paragraph(tmp_path):
    whole = write_tiny_gguf(tmp_path / "whole.gguf")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    result = run_cli("convert", cut, "--out", tmp_path / "out")
    assert result.exit_code == 1
    assert "truncated or damaged" in result.output
    assert not (tmp_path / "out").exists()


def test_quant_type_the_gguf_package_cannot_read(tmp_path, monkeypatch):
    import gguf

    def cannot(data, qtype):
        raise NotImplementedError(f"Dequantization for {qtype.name} is not yet implemented")

    monkeypatch.setattr(gguf.quants, "dequantize", cannot)
    result = run_cli("convert", write_tiny_gguf(tmp_path / "t.gguf"), "--out", tmp_path / "out")
    assert result.exit_code == 1
    assert "cannot de-quantize" in result.output and "pip install -U gguf" in result.output
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial-*"))


# --- base or instruct, from the weights ------------------------------------------------------


def _with_untrained_turn_row(checkpoint: Path) -> None:
    """Make row 106 look like a base model's: the mean of the <unusedN> rows plus a little noise."""
    from safetensors.numpy import load_file, save_file

    from gemma_mlx.flavour import unused_token_ids

    weights = load_file(str(checkpoint / "model.safetensors"))
    table = weights["model.embed_tokens.weight"]
    unused = [i for i in unused_token_ids(checkpoint) if i != 106]
    rng = np.random.default_rng(1)
    table[106] = table[unused].mean(axis=0) + 0.002 * rng.standard_normal(table.shape[1]).astype(np.float32)
    save_file(weights, str(checkpoint / "model.safetensors"), metadata={"format": "pt"})


def test_weights_decide_when_the_turn_row_was_never_trained(tmp_path):
    # named -it, with a chat template and eos [1, 106], but row 106 was never trained: a base model
    checkpoint = write_tiny_checkpoint(tmp_path / "looks-like-gemma-3-it", "it", seed=2)
    _with_untrained_turn_row(checkpoint)
    result = run_cli("convert", checkpoint, "--out", tmp_path / "m")
    assert result.exit_code == 0, result.output
    assert "flavour pt (by weights)" in result.output and "never trained" in result.output
    evidence = json.loads((tmp_path / "m" / "manifest.json").read_text())["flavour_evidence"]
    assert evidence["end_of_turn_cosine"] >= 0.9 and evidence["eos_ids"] == [1, 106]


def test_distinct_turn_row_defers_to_name_and_generation_config(converted_models):
    for flavour in ("pt", "it"):
        manifest = json.loads((converted_models[flavour] / "manifest.json").read_text())
        assert manifest["flavour"] == flavour
        assert manifest["flavour_evidence"]["end_of_turn_cosine"] < 0.9  # random rows are distinct
        assert manifest["flavour_evidence"]["decided_by"] == "name"


def test_flavour_rules():
    from gemma_mlx.flavour import flavour_from_name

    assert flavour_from_name("gemma-3-270m") == "pt"
    assert flavour_from_name("gemma-3-1b-pt") == "pt"
    assert flavour_from_name("gemma-3-1b-it") == "it"
    assert flavour_from_name("gemma-3-270m-it-qat-q4_0") == "it"
    assert flavour_from_name("gemma-3-270m-q4_k_m") is None
    assert flavour_from_name("my-model") is None


def test_gguf_convert_needs_no_torch(tmp_path):
    """`pip install gemma-mlx[real]` brings no PyTorch, so reading a GGUF (tokenizer included) must not import it."""
    import subprocess
    import sys

    gguf_file = write_tiny_gguf(tmp_path / "t.gguf")
    out = tmp_path / "m"
    script = (
        "import sys; sys.modules['torch'] = None\n"  # any `import torch` now raises ImportError
        "from gemma_mlx.cli import main\n"
        f"sys.argv = ['gemma-mlx', 'convert', {str(gguf_file)!r}, '--out', {str(out)!r}]\n"
        "main()\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((out / "tokenizer_config.json").read_text())["bos_token"] == "<bos>"
    assert (out / "model.safetensors").is_file()
