"""`gemma-mlx export`: take a persona to where people chat (llama.cpp, Ollama, LM Studio, a browser).

MODEL is anything the other commands accept: a converted or fused model dir, or BASE::ADAPTERS
(fused in memory here). `--gguf DIR` writes one export directory:

    DIR/<name>-<quant>.gguf   the model for llama.cpp, Ollama and LM Studio
    DIR/Modelfile             `ollama create NAME -f DIR/Modelfile`
    DIR/README.md             a model card: base model, data, recipe, the run's figures, licence
    DIR/manifest.json         what it was made from (the stage-output protocol of every stage)

`--web DIR` writes a folder that chats with the persona in the browser (formats: gemma_mlx/web.py).
Both follow the rules of every stage: a re-run with the same model and settings is a no-op,
a different existing output needs --force, and inputs are never replaced.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .config import GenerationSettings
from .errors import CheckpointError, GemmaMlxError, OutputExistsError
from .manifest import (
    Progress,
    StageOutput,
    atomic_output_dir,
    check_output,
    check_writable,
    finish_output,
    now_iso,
    quiet,
    read_manifest,
    sha256_tree,
    versions,
)
from .model_card import card_text, run_records
from .models import _label, read_json, resolve_model_dir, split_spec

WEB_QUANT_DEFAULT = "q8_0"  # a page's model must stay small: see PAGE_SIZE_WARNING
# Headless Chromium here refused to read a 543 MB model (NotReadableError from its blob store) and read a
# 292 MB one; browsers differ, so a larger file gets a warning, not a refusal.
PAGE_SIZE_WARNING = 450 * 10**6


@dataclass
class ExportSource:
    """The model being exported, resolved once: where its files are and what identifies it."""

    spec: str
    model_dir: Path  # the model dir (for BASE::ADAPTERS: the base)
    adapter_dir: Path | None
    name: str
    identity: dict  # what the export depends on (hashes), the key of the stage output


@dataclass
class ExportResult:
    status: str  # "exported" | "up-to-date"
    gguf_dir: Path | None = None
    gguf_file: Path | None = None
    web_dir: Path | None = None
    manifest: dict = field(default_factory=dict)


def _safe_name(text: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.") or "model"


def resolve_source(spec: str) -> ExportSource:
    """A model dir or BASE::ADAPTERS, checked before any weights load, with the identity of what it holds."""
    from .adapters import check_adapter_dir
    from .fuse import fuse_inputs
    from .models import check_adapters_fit

    spec = str(spec)
    base_spec, adapter_spec = split_spec(spec)
    if adapter_spec is not None:
        base = resolve_model_dir(base_spec).resolve()
        adapter_dir = check_adapter_dir(Path(adapter_spec).expanduser()).resolve()
        check_adapters_fit(base, adapter_dir)
        return ExportSource(spec, base, adapter_dir, _safe_name(_label(adapter_dir)),
                            {"fused": fuse_inputs(adapter_dir, base, True)})
    model_dir = resolve_model_dir(spec).resolve()
    manifest = read_manifest(model_dir) or {}
    identity = {"key_sha256": manifest["key_sha256"]} if manifest.get("key_sha256") else {
        "sha256": sha256_tree(model_dir, "*.safetensors")}
    return ExportSource(spec, model_dir, None, _safe_name(_label(model_dir)), identity)


def float_weights(source: ExportSource) -> tuple[dict, dict]:
    """(HF name -> float32 numpy array, config) of the model, LoRA merged and de-quantized."""
    import mlx.core as mx
    import numpy as np
    from mlx.utils import tree_flatten
    from mlx_lm.utils import dequantize_model

    from .fuse import _merge_lora
    from .models import load

    model, _ = load(source.model_dir, source.adapter_dir)  # LoRA and trained turn-token rows applied
    _merge_lora(model, dequantize=True)
    if any(hasattr(m, "scales") for _, m in model.named_modules()):
        model = dequantize_model(model)
    config = read_json(source.model_dir / "config.json", "config.json")
    weights = {name: np.array(value.astype(mx.float32)) for name, value in tree_flatten(model.parameters())}
    return weights, config


# ---------------------------------------------------------------- what the run knows about the model


def run_context(source: ExportSource) -> dict:
    """What the run that made this model recorded (config, training, scorecard): model_card.run_records."""
    return run_records(source.model_dir, source.adapter_dir)


def generation_settings(recorded: dict | None) -> GenerationSettings:
    """GenerationSettings from a recorded dict (a run's config, an export manifest); unknown keys ignored."""
    settings = GenerationSettings()
    for key, value in (recorded or {}).items():
        if hasattr(settings, key):
            setattr(settings, key, value)
    return settings


def generation_defaults(context: dict) -> GenerationSettings:
    """The run's decoding settings when the model came from a run, else the tool's defaults."""
    return generation_settings((context.get("run_config") or {}).get("generation"))


def persona_name(context: dict, fallback: str) -> str:
    persona = (context.get("run_config") or {}).get("persona")
    if persona and Path(persona).is_file():
        from .persona import load_persona

        try:
            return load_persona(persona).name
        except GemmaMlxError:
            pass
    return fallback


# ---------------------------------------------------------------- Ollama and the model card


def modelfile_text(gguf_file_name: str, settings: GenerationSettings, system: str | None = None) -> str:
    """An Ollama Modelfile: the file, Gemma's turn format as a Go template, stop tokens, the run's decoding."""
    from .formats.gguf import FAMILY  # the family GGUF files hold

    start, end, model = FAMILY.turn_start, FAMILY.turn_end, FAMILY.model_role
    template = (
        '{{- $system := "" }}\n'
        "{{- range .Messages }}\n"
        '{{- if eq .Role "system" }}{{ $system = .Content }}\n'
        f'{{{{- else if eq .Role "user" }}}}{start}user\n'
        f"{{{{ if $system }}}}{{{{ $system }}}}\n\n{{{{ $system = \"\" }}}}{{{{ end }}}}{{{{ .Content }}}}{end}\n"
        f'{{{{ else if eq .Role "assistant" }}}}{start}{model}\n'
        f"{{{{ .Content }}}}{end}\n"
        "{{ end }}\n"
        f"{{{{- end }}}}{start}{model}\n"
    )
    lines = [
        "# Ollama: ollama create <name> -f Modelfile, then ollama run <name>",
        f"FROM ./{gguf_file_name}",
        f'TEMPLATE """{template}"""',
        f'PARAMETER stop "{end}"',
        f'PARAMETER stop "{FAMILY.eos}"',
        f"PARAMETER temperature {settings.temperature:g}",
        f"PARAMETER repeat_penalty {settings.repetition_penalty:g}",
        f"PARAMETER num_predict {settings.max_tokens}",
    ]
    if settings.top_p < 1.0:
        lines.append(f"PARAMETER top_p {settings.top_p:g}")
    if settings.top_k > 0:
        lines.append(f"PARAMETER top_k {settings.top_k}")
    if system:
        lines.append(f'SYSTEM """{system}"""')
    return "\n".join(lines) + "\n"


def model_card(name: str, gguf_file: str, quant: str, source: ExportSource, context: dict,
               settings: GenerationSettings, size_bytes: int) -> str:
    """README.md next to the GGUF: the one card (model_card.card_text) with this format's way to run it."""
    ollama = _safe_name(name).lower()
    run_it = [f"llama-cli -m {gguf_file} -cnv          # llama.cpp (uses the file's chat template)",
              f"ollama create {ollama} -f Modelfile && ollama run {ollama}",
              f"lms import {gguf_file}                 # LM Studio, or copy this folder to ~/.lmstudio/models/<you>/{name}/"]
    decoding = (f"Decoding used by the run: temperature {settings.temperature:g}, repeat penalty "
                f"{settings.repetition_penalty:g}, at most {settings.max_tokens} tokens; a turn ends with `<end_of_turn>`.")
    intro = f"A Gemma 3 model exported by gemma-mlx as `{gguf_file}` ({quant}, {size_bytes / 1e6:.0f} MB)."
    return card_text(name, source.model_dir, context, intro, run_it, library="gguf", fallback=source.spec,
                     decoding=decoding)


# ---------------------------------------------------------------- the stage


def _gguf_dir(path: Path) -> Path:
    """`--gguf out/bluey.gguf` means the export directory out/bluey/ (the file inside is named for it)."""
    path = Path(path).expanduser()
    return path.with_suffix("") if path.suffix == ".gguf" else path


def export_gguf(source: ExportSource, out: Path, quant: str = "f16", force: bool = False,
                progress: Progress = quiet, title: str | None = None) -> ExportResult:
    """Write the GGUF export directory for `source` (see the module docstring); a no-op when up to date."""
    from .formats.gguf_write import QUANTS, check_model_type, check_tokenizer, write_gguf

    if quant not in QUANTS:
        raise GemmaMlxError(f"Unknown --quant {quant!r}. Choose one of: {', '.join(QUANTS)}. K-quants (Q4_K_M, ...) "
                            "need llama.cpp's llama-quantize run on the f16 file.")
    out = _gguf_dir(out)
    inputs = {"the model it exports": source.model_dir}
    if source.adapter_dir is not None:
        inputs["the adapters"] = source.adapter_dir
    output = StageOutput("export", out, key={"source": source.identity, "quant": quant, "format": "gguf"}, inputs=inputs)
    existing = check_output(output, force, progress)
    stem = _safe_name(out.name)
    file_name = f"{stem}.gguf" if stem.endswith(f"-{quant}") else f"{stem}-{quant}.gguf"
    if existing:
        progress(f"{out}: already exported from the same model with the same settings, nothing to do")
        return ExportResult("up-to-date", out, out / file_name, manifest=existing)
    tokenizer_file = source.model_dir / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise CheckpointError(f"{source.model_dir} has no tokenizer.json, which the GGUF file's vocabulary is made from. "
                              "Convert the model again with `gemma-mlx convert`.")
    tokenizer_json = read_json(tokenizer_file, "tokenizer.json")
    check_model_type(read_json(source.model_dir / "config.json", "config.json"))  # a family GGUF cannot hold
    check_tokenizer(tokenizer_json)
    started = time.perf_counter()
    context = run_context(source)
    settings = generation_defaults(context)
    progress(f"export: loading {source.spec}" + (" and merging its adapters" if source.adapter_dir else ""))
    weights, config = float_weights(source)
    need = sum(w.size for w in weights.values()) * (4 if quant == "f32" else 2) + (64 << 20)
    check_writable(out.parent, need_bytes=need)
    name = persona_name(context, title or out.name)
    with atomic_output_dir(out, force=True) as tmp:
        types = write_gguf(tmp / file_name, weights, config, tokenizer_json, name=name, quant=quant, progress=progress)
        del weights
        size = (tmp / file_name).stat().st_size
        (tmp / "Modelfile").write_text(modelfile_text(file_name, settings))
        (tmp / "README.md").write_text(model_card(name, file_name, quant, source, context, settings, size))
        seconds = round(time.perf_counter() - started, 2)
        manifest = finish_output(tmp, output, {
            "source_model": source.spec,
            "source_dir": str(source.model_dir),
            "adapters": str(source.adapter_dir) if source.adapter_dir else None,
            "source_id": source.identity,
            "format": "gguf",
            "quant": quant,
            "file": file_name,
            "size_bytes": size,
            "tensor_types": types,
            "generation": asdict(settings),
            "persona_name": name,
            "seconds": seconds,
            "created": now_iso(),
            "versions": versions(),
        })
    progress(f"exported {out / file_name} ({quant}, {size / 1e6:.0f} MB) in {seconds:.0f} s")
    return ExportResult("exported", out, out / file_name, manifest=manifest)


def export_model(spec: str, gguf: Path | None = None, web: Path | None = None, quant: str | None = None,
                 force: bool = False, progress: Progress = quiet) -> ExportResult:
    """`gemma-mlx export`: a GGUF export dir, a web page, or both (the page reuses the GGUF file)."""
    if gguf is None and web is None:
        raise GemmaMlxError("Say where to export: --gguf DIR (llama.cpp, Ollama, LM Studio) and/or --web DIR "
                            "(a page that runs the model in the browser).")
    if web is not None:
        from .web import check_runtime

        check_runtime()  # before any weights load
    source = resolve_source(spec)
    quant = quant or (WEB_QUANT_DEFAULT if web is not None else "f16")
    title = None
    if gguf is None:  # the page needs a GGUF file too: keep it in outputs/export/ so a re-run reuses it
        from .manifest import outputs_root, sha256_json

        # named for the model and what it holds, so two models whose folders share a name never meet there
        gguf, title = outputs_root() / "export" / f"{source.name}-{quant}-{sha256_json(source.identity)[:8]}", source.name
    if web is not None:
        check_web_target(Path(web).expanduser(), _gguf_dir(gguf), force)  # before the GGUF work, not after it
    result = export_gguf(source, gguf, quant=quant, force=force, progress=progress, title=title)
    if web is not None:
        result.web_dir = export_web(result, Path(web).expanduser(), force=force, progress=progress)
    return result


def check_web_target(web: Path, gguf_dir: Path, force: bool) -> None:
    """Refuse a --web folder that could not be written before the GGUF file is made (minutes for a big model):
    the GGUF folder itself (or inside it, or around it), a folder `export --web` did not write, or
    another export's page without --force. The full check (export_web) follows once the GGUF key is known."""
    target, gguf = web.resolve(), gguf_dir.resolve()
    if target == gguf or gguf in target.parents or target in gguf.parents:
        raise OutputExistsError(f"--web {web} and the GGUF export {gguf_dir} would overlap; give the page a folder of "
                                "its own, beside the GGUF export rather than in it.")
    if not target.exists() or (target.is_dir() and not any(target.iterdir())):
        return
    manifest = read_manifest(target) or {}
    if manifest.get("stage") != "export-web":
        raise OutputExistsError(f"{web} already exists and holds something that `export --web` did not write (no "
                                "export-web manifest.json), so it is not replaced, even with --force. Choose another "
                                "output directory, or move it away yourself.")
    page_of = manifest.get("gguf_export")
    if not force and (not page_of or Path(page_of).resolve() != gguf):
        raise OutputExistsError(f"{web} already holds the page of another export ({page_of}). Re-run with --force to "
                                "replace it, or choose another output directory.")


def export_web(gguf_result: ExportResult, out: Path, force: bool = False, progress: Progress = quiet) -> Path:
    """The browser page for an exported GGUF (web.py builds it), under the same output rules."""
    from .web import fill_page, page_settings

    manifest = gguf_result.manifest
    generation = generation_settings(manifest.get("generation"))
    settings = page_settings(manifest.get("persona_name") or gguf_result.gguf_dir.name, generation)
    output = StageOutput("export-web", out, key={"gguf": manifest.get("key_sha256"), "settings": settings},
                         inputs={"the GGUF export": gguf_result.gguf_dir})
    existing = check_output(output, force, progress)
    if existing:
        progress(f"{out}: the page is up to date, nothing to do")
        return out
    size = gguf_result.gguf_file.stat().st_size
    if size > PAGE_SIZE_WARNING:
        progress(f"warning: the page's model is {size / 1e6:.0f} MB; some browsers cannot load a file over about "
                 f"{PAGE_SIZE_WARNING / 1e6:.0f} MB in one piece (headless Chromium refused 543 MB). Export with "
                 "--quant q8_0 or q4_0 for the page.")
    with atomic_output_dir(out, force=True) as tmp:
        fill_page(tmp, gguf_result.gguf_file, settings)
        finish_output(tmp, output, {"gguf_export": str(gguf_result.gguf_dir.resolve()), "settings": settings,
                                    "created": now_iso(), "versions": versions()})
    progress(f"web page: {out} (serve it with `gemma-mlx web {out}`, then open the URL it prints)")
    return out
