"""``imdpipe sweep``: a Table-4-style ablation grid trained head-only on cached embeddings."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from imdpipe.cli.options import CacheOpt, cli_errors
from imdpipe.train.config import FIELD_HELP


def sweep_cmd(
    cache: CacheOpt,
    out: Annotated[Path, typer.Option("--out", help="Directory for results.jsonl, table.md, table.csv and "
                                      "table.png (a rerun skips the runs already in results.jsonl).")],
    grid: Annotated[str, typer.Option(
        "--grid", help="The grid: key=v1,v2 entries separated by spaces, keys alpha, scheme, k, ya, overlap, fusion, "
                       "cross_modal_p and seeds (repeats), e.g. --grid alpha=0.1,0.25,0.5 scheme=M,W ya=10,20 "
                       "k=5,10 overlap=iou,dice seeds=0,1,2. k / ya / overlap rebuild the relevance targets in "
                       "memory; unset ones come from relevance.zarr.")],
    more: Annotated[Optional[list[str]], typer.Argument(help="More key=values entries of --grid.",
                                                        show_default=False)] = None,
    visual: Annotated[Optional[Path], typer.Option("--visual", help="Visual store (default: CACHE/visual.zarr).")
                      ] = None,
    savld: Annotated[Optional[Path], typer.Option("--savld", help="SAVLD for rebuilt targets "
                                                  "(default: CACHE/savld.zarr).")] = None,
    config: Annotated[Optional[Path], typer.Option(
        "--config", help="config.yaml shared by every cell (the grid overrides its fields). Default: the config "
                         "of the run whose streams made the visual store, else the paper's defaults.")] = None,
    fusion: Annotated[Optional[str], typer.Option("--fusion", help=FIELD_HELP["fusion"])] = None,
    epochs: Annotated[Optional[int], typer.Option("--epochs", help=FIELD_HELP["epochs"])] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", help=FIELD_HELP["batch_size"])] = None,
    lr: Annotated[Optional[float], typer.Option("--lr", help=FIELD_HELP["lr"])] = None,
    test_split: Annotated[str, typer.Option("--test-split", help="Split scored after the last epoch.")] = "test",
    workers: Annotated[Optional[int], typer.Option(
        "--workers", min=1, help="Runs trained at once, one process and one thread each (default: the cores this "
                                 "process may use).")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
):
    """Train every cell of an ablation grid head-only (seconds per cell) and write a Table-4-style table
    with the mean and 95% interval over seeds. Head-only numbers are an ablation tool: the paper trains
    end to end."""
    from imdpipe.contract import VISUAL
    from imdpipe.train.config import TrainConfig, load_config
    from imdpipe.train.sweep import parse_grid, run_sweep

    with cli_errors():
        entries = parse_grid([*grid.split(), *(more or [])])
        if config is None:
            config = _source_config(Path(visual) if visual else VISUAL.path(cache))
        base = load_config(config) if config is not None else TrainConfig()
        overrides = {k: v for k, v in dict(fusion=fusion, epochs=epochs, batch_size=batch_size, lr=lr).items()
                     if v is not None}
        base = base.replace(**overrides)
        run_sweep(cache=cache, out=out, grid=entries, config=base, visual=visual, savld=savld, test_split=test_split,
                  workers=workers, show_progress=not quiet)


def _source_config(visual: Path) -> Path | None:
    """config.yaml of the run whose streams made the visual store, when it is still there."""
    import zarr

    if not visual.exists():
        return None
    source = dict(zarr.open_group(visual, mode="r").attrs).get("streams", {})
    if source.get("kind") != "run":
        return None
    path = Path(source["checkpoint"]).parent / "config.yaml"
    return path if path.is_file() else None
