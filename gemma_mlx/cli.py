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


def echo_progress(message: str) -> None:
    """Progress goes to stderr so stdout stays clean for results (and --json)."""
    click.echo(message, err=True)


class FriendlyGroup(click.Group):
    """Turns our typed errors into ClickExceptions: a message, exit code 1, no traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except GemmaMlxError as error:
            raise click.ClickException(str(error)) from None
        except KeyboardInterrupt:
            click.echo("\nInterrupted. Finished outputs are kept; nothing half-written was left behind.", err=True)
            ctx.exit(130)


def _version_text() -> str:
    from .backend import backend_info

    return "\n".join([f"gemma-mlx {__version__}", *backend_info().lines()])


def _print_version(ctx, _param, value):
    if value and not ctx.resilient_parsing:
        click.echo(_version_text())
        ctx.exit()


@click.group(cls=FriendlyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--version", is_flag=True, expose_value=False, is_eager=True, callback=_print_version,
              help="Show the version, MLX backend, device, BLAS and dtype policy, then exit.")
def cli():
    """Give a small Gemma 3 model a personality: convert, fine-tune with LoRA, fuse, compare.

    Start with `gemma-mlx convert gemma-3-1b-pt gemma-3-1b-it`, or see README.md.
    """


@cli.command()
def info():
    """Show the MLX backend, device, BLAS and dtype policy in effect."""
    click.echo(_version_text())


@cli.command()
@click.argument("checkpoints", nargs=-1, required=True)
@click.option("--out", type=click.Path(path_type=Path),
              help="Output directory (one checkpoint) or parent directory (several). Default: outputs/models/<name>.")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]),
              help="Weight dtype. Default: float32 on a Linux CPU (BLAS-fast), bfloat16 with Metal.")
@click.option("-q", "--quantize", "quantize_bits", type=click.Choice(["4", "8"]), help="Quantize weights to 4 or 8 bits.")
@click.option("--group-size", default=64, show_default=True, help="Quantization group size.")
@click.option("--revision", help="Hub branch, tag or commit to download.")
@click.option("--force", is_flag=True, help="Replace an existing output that was made differently.")
def convert(checkpoints, out, dtype, quantize_bits, group_size, revision, force):
    """Convert Gemma 3 checkpoints to MLX, ready for training and comparison.

    CHECKPOINTS are short names (gemma-3-270m, gemma-3-270m-it, gemma-3-1b-pt, gemma-3-1b-it),
    hub ids (owner/name) or local Hugging Face checkpoint directories. Each converted model gets the
    Gemma turn template and stops on <end_of_turn>. Re-running with the same inputs does nothing.
    """
    from .checkpoints import convert_checkpoint, convert_many

    options = dict(dtype=dtype, quantize_bits=int(quantize_bits) if quantize_bits else None,
                   group_size=group_size, revision=revision, force=force)
    if len(checkpoints) == 1:
        results = [convert_checkpoint(checkpoints[0], out=out, progress=echo_progress, **options)]
    else:
        results = convert_many(list(checkpoints), out_root=out, progress=echo_progress, **options)
    for result in results:
        click.echo(f"{result.name}\t{result.status}\t{result.path}")


def main():
    cli(prog_name="gemma-mlx")


if __name__ == "__main__":
    sys.exit(main())
