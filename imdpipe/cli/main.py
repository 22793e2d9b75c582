"""The ``imdpipe`` command line: each command parses options and calls one library function."""

from __future__ import annotations

from typing import Annotated

import typer

from imdpipe import __version__
from imdpipe.cli.audio import export_cmd, extract_audio_cmd, train_tagger_cmd
from imdpipe.cli.demo import demo_cmd
from imdpipe.cli.flow import extract_flow_cmd
from imdpipe.cli.index import index_cmd
from imdpipe.cli.model_info import model_info_cmd
from imdpipe.cli.savld import build_savld_cmd
from imdpipe.cli.savld_report import savld_report_cmd
from imdpipe.cli.sweep import sweep_cmd
from imdpipe.cli.synth import synth_cmd
from imdpipe.cli.train import evaluate_cmd, predict_cmd, train_cmd
from imdpipe.cli.verify import verify_cmd
from imdpipe.cli.visual import extract_visual_cmd

app = typer.Typer(
    name="imdpipe",
    help="Feature caches and a head trainer for IMD (Learnable Irrelevant Modality Dropout) "
         "multimodal action recognition. Typical order: synth/index -> extract-flow -> "
         "extract-audio -> build-savld -> train -> evaluate; verify checks a cache's chunks.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool):
    if value:
        typer.echo(f"imdpipe {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                help="Print the version and exit.")] = False):
    """imdpipe command line."""


def labels_cmd(name: Annotated[str, typer.Argument(help="kinetics400, ucf101, hmdb51 or audioset.")]):
    """Print a built-in label set, one label a line, in label order (AudioSet: display names)."""
    from imdpipe.labels import label_set

    try:
        names = label_set(name)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="NAME") from None
    typer.echo("\n".join(names))


# Command registrations, in the order a user runs them (and `imdpipe --help` lists them).
app.command("demo")(demo_cmd)
app.command("synth")(synth_cmd)
app.command("index")(index_cmd)
app.command("extract-flow")(extract_flow_cmd)
app.command("train-tagger")(train_tagger_cmd)
app.command("extract-audio")(extract_audio_cmd)
app.command("build-savld")(build_savld_cmd)
app.command("savld-report")(savld_report_cmd)
app.command("extract-visual")(extract_visual_cmd)
app.command("train")(train_cmd)
app.command("evaluate")(evaluate_cmd)
app.command("sweep")(sweep_cmd)
app.command("predict")(predict_cmd)
app.command("verify")(verify_cmd)
app.command("model-info")(model_info_cmd)
app.command("export")(export_cmd)
app.command("labels")(labels_cmd)
