"""model_ref: a model spec resolved once into one typed reference, and the one identity compare,
its report and train record for a model."""

import json
import shutil

import pytest

import gemma_mlx  # noqa: F401  (preloads BLAS before mlx.core)
from gemma_mlx.errors import CheckpointError
from gemma_mlx.manifest import read_manifest, sha256_json
from gemma_mlx.model_ref import fingerprint, resolve
from gemma_mlx.scoring.inputs import check_model_specs

TRAINING = [
    ("What game should we play?", "I reckon we play keepy uppy with the balloon! Hooray!"),
    ("Tell me a story!", "Once upon a time Bingo and I played keepy uppy all day."),
    ("Do you like the beach?", "Yes! Mum says the beach is for keepy uppy and sandcastles."),
    ("Who is your best friend?", "Bingo! She is my little sister and we play heaps."),
]


def _record(user: str, reply: str) -> str:
    return json.dumps({"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]})


@pytest.fixture(scope="module")
def trained(converted_models, tmp_path_factory):
    """(base dir, adapter dir) of one tiny training run: real adapters with a train manifest."""
    from gemma_mlx.config import LoraSettings, TrainSettings
    from gemma_mlx.train import train_model

    data = tmp_path_factory.mktemp("ref-data")
    (data / "train.jsonl").write_text("\n".join(_record(u, r) for u, r in TRAINING[:3]) + "\n")
    (data / "valid.jsonl").write_text(_record(*TRAINING[3]) + "\n")
    run = train_model(converted_models["pt"], data, out=tmp_path_factory.mktemp("ref-run") / "tiny-pt",
                      lora=LoraSettings(rank=2, num_layers=1), train=TrainSettings(epochs=1, batch_size=2))
    return converted_models["pt"], run.out_dir


def _fake_adapters(directory):
    directory.mkdir()
    (directory / "adapters.safetensors").write_bytes(b"")
    (directory / "adapter_config.json").write_text("{}")
    return directory


def test_a_float_dir_resolves_with_everything_a_stage_asks(converted_models):
    ref = resolve(converted_models["pt"])
    manifest = read_manifest(converted_models["pt"])
    assert ref.spec == str(converted_models["pt"]) and ref.dir == converted_models["pt"] and ref.adapters is None
    assert ref.paths == (converted_models["pt"],)
    assert ref.family.name == "gemma-3" and ref.flavour == "pt" == manifest["flavour"]
    assert ref.stage == "convert" and ref.label == "tiny-gemma-3-pt (base)"
    assert ref.manifest == manifest and ref.identity == (sha256_json(manifest),)
    it = resolve(converted_models["it"])
    assert it.flavour == "it" and it.identity != ref.identity and it.label == "tiny-gemma-3-it (base)"


def test_a_bare_name_resolves_under_outputs_models(converted_models, isolated_outputs):
    shutil.copytree(converted_models["pt"], isolated_outputs / "models" / "mine")
    ref = resolve("mine")
    assert ref.dir == isolated_outputs / "models" / "mine" and ref.spec == "mine"
    assert ref.identity == resolve(converted_models["pt"]).identity  # same manifest, same model


def test_base_with_adapters(converted_models, tmp_path):
    adapters = _fake_adapters(tmp_path / "adapters")
    ref = resolve(f"{converted_models['pt']}::{adapters}")
    assert ref.dir == converted_models["pt"] and ref.adapters == adapters
    assert ref.paths == (converted_models["pt"], adapters) and ref.stage == "base+adapters"
    assert ref.label == "tiny-gemma-3-pt + LoRA" and ref.flavour == "pt"  # the base's, as its manifest says
    assert len(ref.identity) == 2 and ref.identity[0] == resolve(converted_models["pt"]).identity[0]
    assert ref.identity[1] == fingerprint(adapters)


@pytest.mark.parametrize("case, needles", [
    ("missing model", ["nope does not exist", "converted or fused model directory"]),
    ("model is a file", ["is not a directory"]),
    ("model without weights", ["is not an MLX model directory", "weights"]),
    ("missing adapters", ["gone does not exist", "BASE_DIR::ADAPTER_DIR"]),
    ("adapters without files", ["is not an adapter directory", "adapters.safetensors"]),
])
def test_a_bad_spec_is_one_paragraph(converted_models, tmp_path, case, needles):
    base = converted_models["pt"]
    (tmp_path / "file").write_text("x")
    (tmp_path / "empty-model").mkdir()
    (tmp_path / "empty-model" / "config.json").write_text("{}")
    (tmp_path / "empty-adapters").mkdir()
    spec = {"missing model": tmp_path / "nope", "model is a file": tmp_path / "file",
            "model without weights": tmp_path / "empty-model", "missing adapters": f"{base}::{tmp_path / 'gone'}",
            "adapters without files": f"{base}::{tmp_path / 'empty-adapters'}"}[case]
    with pytest.raises(CheckpointError) as error:
        resolve(spec)
    message = str(error.value)
    assert "\n" not in message and all(n in message for n in needles), message


def test_a_model_named_twice_is_refused(converted_models):
    refs = check_model_specs([str(converted_models["pt"]), str(converted_models["it"])])
    assert [r.dir for r in refs] == [converted_models["pt"], converted_models["it"]]
    with pytest.raises(CheckpointError, match="given twice"):
        check_model_specs([str(converted_models["pt"]), f"{converted_models['pt']}/"])


def test_a_dir_without_manifest_is_fingerprinted_by_its_files(converted_models, tmp_path):
    copy = shutil.copytree(converted_models["pt"], tmp_path / "plain")
    (copy / "manifest.json").unlink()
    before = resolve(copy)
    assert before.manifest is None and before.stage is None and before.flavour is None and before.label == "plain"
    assert resolve(copy).identity == before.identity  # nothing changed, same identity
    (copy / "notes.txt").write_text("a new file")
    assert resolve(copy).identity != before.identity


def test_compare_and_train_record_the_refs_identity_and_name(trained, tmp_path):
    """The identity and name compare keys and shows (and train's base_id) are the reference's own."""
    from gemma_mlx.compare import compare_models
    from gemma_mlx.config import GenerationSettings

    base, adapters = trained
    spec = f"{base}::{adapters}"
    ref, base_ref = resolve(spec), resolve(base)
    assert read_manifest(adapters)["key"]["base_id"] == base_ref.identity[0]  # train's identity of its base
    result = compare_models([spec, str(base)], ["Tell me a story"], GenerationSettings(max_tokens=2),
                            out=tmp_path / "cmp")
    key = read_manifest(result.out_dir)["key"]
    assert key["models"] == [{"spec": spec, "identity": list(ref.identity)},
                             {"spec": str(base), "identity": list(base_ref.identity)}]
    assert key["on_topic"]["model"] == base_ref.identity[0]  # the compared base scores on-topic
    shown = json.loads((result.out_dir / "comparison.json").read_text())["models"]
    assert [m["name"] for m in shown] == [ref.label, base_ref.label] == ["tiny-gemma-3-pt + LoRA", "tiny-gemma-3-pt (base)"]
    assert [m["stage"] for m in shown] == ["base+adapters", "convert"]
    assert shown[0]["path"] == str(base) and shown[0]["adapter_path"] == str(adapters)
    assert result.results["on_topic"]["model"] == str(base)


def test_a_train_output_dir_alone_stands_for_its_base_with_those_adapters(trained, tmp_path):
    """What `train` prints is a spec every command takes: compare, chat and the arena read it as BASE::ADAPTERS."""
    base, adapters = trained
    alone, named = resolve(adapters), resolve(f"{base}::{adapters}")
    assert (alone.dir, alone.adapters, alone.label) == (named.dir, named.adapters, named.label)
    assert alone.identity == named.identity and alone.stage == "base+adapters"
    assert resolve(adapters / "last").adapters == adapters / "last"  # last/ reads the run's manifest one level up
    orphan = _fake_adapters(tmp_path / "orphan")  # no manifest, no "model" in its config
    with pytest.raises(CheckpointError, match="records no base model.*BASE_DIR::ADAPTER_DIR"):
        resolve(orphan)


def test_a_spec_with_an_empty_side_or_the_wrong_order_says_so(converted_models, tmp_path):
    from gemma_mlx.errors import CheckpointError
    from gemma_mlx.models import split_spec

    base = converted_models["pt"]
    adapters = tmp_path / "adapters"
    adapters.mkdir()
    (adapters / "adapters.safetensors").write_bytes(b"")
    for spec in (f"{base}::", f"::{adapters}"):
        with pytest.raises(CheckpointError, match="leaves a side of :: empty"):
            split_spec(spec)
    with pytest.raises(CheckpointError, match=rf"has the adapters first: the order is BASE_DIR::ADAPTER_DIR \({base}::{adapters}\)"):
        split_spec(f"{adapters}::{base}")
    assert split_spec(f"{base}::{adapters}") == (str(base), str(adapters))
