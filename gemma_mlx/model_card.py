"""The one model card (README.md) written beside every model the tool makes: a fused dir, a Hugging
Face export and a GGUF export all say the same things in the same words.

A card says what the model is made from (the base, the data, the recipe and the epoch kept), how it
did in the run's comparison when there was one, how to run it, and its licence. Everything it says
is read from the manifests the stages wrote; a fact that cannot be found is left out, never guessed.
The per-format parts (the opening sentence, the commands to run it) come from the caller.
"""

from __future__ import annotations

import json
from pathlib import Path

from .families import DEFAULT, Family, family_of_config
from .flavour import family_of_dir
from .manifest import read_manifest


def run_records(model_dir: Path, adapter_dir: Path | None = None) -> dict:
    """What the run that made this model recorded: {"train", "run_config", "scorecard", "scorecard_model"}.

    The adapters are the ones given, else the ones a fused dir's manifest names, else the parent of a
    dir named `fused` (runs/<experiment>/<checkpoint>/fused). A missing record is simply absent.
    """
    model_dir = Path(model_dir)
    own = read_manifest(model_dir) or {}
    records: dict = {}
    fused_here = adapter_dir is None  # with adapters given, model_dir is their base: never match it by path
    if own.get("stage") == "fuse" and isinstance(own.get("train_manifest"), dict):
        records["train"] = own["train_manifest"]
    if adapter_dir is None and own.get("stage") == "fuse" and own.get("adapters"):
        adapter_dir = Path(own["adapters"])
    if adapter_dir is None and model_dir.name == "fused":
        adapter_dir = model_dir.parent
    if adapter_dir is None:
        return records
    adapter_dir = Path(adapter_dir)
    if "train" not in records:
        train = read_manifest(adapter_dir) if adapter_dir.is_dir() else None
        if (train or {}).get("stage") == "train":
            records["train"] = train
    run_dir = adapter_dir.parent
    run = (read_manifest(run_dir) if run_dir.is_dir() else None) or {}
    if run.get("stage") == "run" and isinstance(run.get("config"), dict):
        records["run_config"] = run["config"]
    entry = _comparison_entry(run_dir / "compare" / "comparison.json", model_dir if fused_here else None, adapter_dir)
    if entry is not None:
        records["scorecard"] = entry.get("scorecard") or {}
        records["scorecard_model"] = entry.get("name")
    return records


def _comparison_entry(path: Path, model_dir: Path | None, adapter_dir: Path) -> dict | None:
    """This model's entry in a run's comparison.json: by its path, else by the names compare gives it."""
    if not path.is_file():
        return None
    try:
        models = json.loads(path.read_text(encoding="utf-8")).get("models") or []
    except (OSError, ValueError, AttributeError):
        return None
    models = [m for m in models if isinstance(m, dict)]
    here = str(model_dir.resolve()) if model_dir is not None else None
    for entry in models:
        if here and entry.get("path") and str(Path(str(entry["path"])).resolve()) == here:
            return entry
    for entry in models:
        if entry.get("name") == f"{adapter_dir.name}-fused" or str(entry.get("name", "")).startswith(adapter_dir.name):
            return entry
    return None


def base_manifest_of(model_dir: Path, records: dict) -> dict:
    """The converted base's manifest: given, from training's record, a fused dir's base, or the model dir's own."""
    if isinstance(records.get("base_manifest"), dict):
        return records["base_manifest"]
    train = records.get("train") or {}
    if isinstance(train.get("base_manifest"), dict):
        return train["base_manifest"]
    own = read_manifest(Path(model_dir)) or {}
    if own.get("stage") == "fuse" and own.get("base_model") and Path(own["base_model"]).is_dir():
        return read_manifest(Path(own["base_model"])) or {}
    return own


def _number(value) -> str:
    """1.0 as 1, 8.014045 as 8.014: a card is read by people."""
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else f"{value:.3f}"
    return "?" if value is None else str(value)


def _pct(value) -> str:
    return f"{value:.0%}" if isinstance(value, (int, float)) else "?"


def made_from_lines(model_dir: Path, records: dict, fallback: str) -> list[str]:
    """The "Made from" bullets: base, data, recipe, the epoch kept."""
    base_manifest = base_manifest_of(model_dir, records)
    source = base_manifest.get("source") if isinstance(base_manifest.get("source"), dict) else {}
    base = source.get("hub_id") or source.get("spec") or base_manifest.get("name") or str(model_dir)
    lines = [f"- base model: `{base}` ({base_manifest.get('flavour', '?')})"]
    train = records.get("train")
    if not train:
        return lines + [f"- not fine-tuned by gemma-mlx as far as its records show; made from `{fallback}`"]
    settings = train.get("settings") or {}
    summary = train.get("summary") or {}
    lora, recipe = settings.get("lora") or {}, settings.get("train") or {}
    return lines + [
        f"- data: `{train.get('data')}` ({summary.get('train_examples', '?')} training conversations)",
        f"- recipe: {lora.get('fine_tune_type', 'lora')} rank {lora.get('rank')}, {recipe.get('epochs')} epoch{'' if recipe.get('epochs') == 1 else 's'}, "
        f"batch {recipe.get('batch_size')}, learning rate {recipe.get('learning_rate')}, "
        f"turn-token rows trained: {summary.get('turn_tokens_trained')}",
        f"- kept: epoch {_number(summary.get('best_epoch'))} (chosen by {summary.get('best_by')}), "
        f"best validation loss {_number(summary.get('best_val_loss'))}",
    ]


def scorecard_lines(records: dict) -> list[str]:
    """The "How it did" section: the run's comparison figures, or where to get them."""
    card = records.get("scorecard")
    if not card:
        return ["## How it did", "",
                "Not compared yet. `gemma-mlx compare` (or `gemma-mlx run`) scores its replies: how many end by "
                "themselves, loops, length and persona markers."]
    mean_words = card.get("mean_words")
    return [f"## How it did (the run's comparison, `{records.get('scorecard_model')}`)", "",
            f"- replies: {card.get('replies')}, ended by themselves: {_pct(card.get('stop_rate'))}, "
            f"cut by the limit: {_pct(card.get('cut_rate'))}, loops: {_pct(card.get('loop_rate'))}",
            f"- mean words: {mean_words:.1f}" if isinstance(mean_words, (int, float)) else "- mean words: ?",
            f"- persona markers: {_pct(card.get('persona_marker_rate'))}"]


def _front_matter(base_manifest: dict, library: str, fine_tuned: bool, family: Family = DEFAULT) -> list[str]:
    """Hugging Face's card metadata, so the hub shows the licence, the base model and the library."""
    source = base_manifest.get("source")
    hub_id = source.get("hub_id") if isinstance(source, dict) else None
    tags = f"[{family.hub_tag}, lora, persona, gemma-mlx]" if fine_tuned else f"[{family.hub_tag}, gemma-mlx]"
    lines = ["---", f"license: {family.licence_id}", f"library_name: {library}", "pipeline_tag: text-generation",
             f"tags: {tags}"]
    if hub_id:
        lines.append(f"base_model: {hub_id}")
    return lines + ["---", ""]


def card_text(name: str, model_dir: Path, records: dict, intro: str, run_it: list[str], library: str,
              fallback: str | None = None, decoding: str | None = None, language: str = "bash") -> str:
    """README.md for a model: front matter, intro, made from, how it did, run it, licence.

    `intro` is the format's opening sentence and `run_it` its commands (in `language`); `library` is
    the hub's library_name (mlx, transformers, gguf).
    """
    model_dir = Path(model_dir)
    base_manifest = base_manifest_of(model_dir, records)
    family = family_of_config({"model_type": base_manifest.get("model_type")})  # what convert recorded
    front = _front_matter(base_manifest, library, fine_tuned=bool(records.get("train")), family=family)
    lines = [*front, f"# {name}", "", intro, "",
             "## Made from", "", *made_from_lines(model_dir, records, fallback or str(model_dir)), "",
             *scorecard_lines(records), "",
             "## Run it", "", f"```{language}", *run_it, "```", ""]
    if decoding:
        lines += [decoding, ""]
    lines += ["## Licence", "", family.licence, ""]
    return "\n".join(lines)


def fused_card(out: Path, name: str, base: Path, adapter_dir: Path, train_manifest: dict | None) -> str:
    """The card of a fused dir. Fusing comes before any comparison, so it has no scorecard yet."""
    records: dict = {"base_manifest": read_manifest(Path(base)) or {}}
    if train_manifest:
        records["train"] = train_manifest
    family = family_of_dir(Path(base))
    intro = (f"A {family.title} model fused by gemma-mlx: LoRA adapters (and, for a base model, the trained turn-token "
             f"rows) baked into the base, in MLX format. A reply ends with `{family.turn_end}`.")
    run_it = [f"gemma-mlx chat {out}", f'mlx_lm.generate --model {out} --prompt "Hello!"', f"mlx_lm.server --model {out}"]
    return card_text(name, Path(out), records, intro, run_it, library="mlx", fallback=str(adapter_dir))


def hf_card(model_dir: Path, out: Path, dtype: str) -> str:
    """The card of a Hugging Face export (`fuse --export-hf`), with the run's scorecard when it has one."""
    model_dir = Path(model_dir)
    records = run_records(model_dir)
    name = (read_manifest(model_dir) or {}).get("name") or model_dir.name
    family = family_of_dir(model_dir)
    intro = (f"A {family.title} model exported by gemma-mlx for Hugging Face transformers ({family.causal_lm_architecture}, "
             f"{dtype} safetensors). Its generation config stops on `{family.turn_end}` and its tokenizer carries the "
             "turn template.")
    run_it = ["from transformers import AutoModelForCausalLM, AutoTokenizer",
              f'tokenizer = AutoTokenizer.from_pretrained("{out}")',
              f'model = AutoModelForCausalLM.from_pretrained("{out}")',
              'ids = tokenizer.apply_chat_template([{"role": "user", "content": "Hello!"}], add_generation_prompt=True,',
              '                                    return_tensors="pt", return_dict=False)',
              "reply = model.generate(ids, max_new_tokens=128)[0, ids.shape[1]:]",
              "print(tokenizer.decode(reply, skip_special_tokens=True))"]
    return card_text(name, model_dir, records, intro, run_it, library="transformers", fallback=str(model_dir),
                     language="python")
