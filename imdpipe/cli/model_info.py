"""``imdpipe model-info``: parameters and GFLOPs of a model size, beside the paper's Table 4."""

from __future__ import annotations

import json
from typing import Annotated

import typer

SIZE_HELP = "Visual transformer size: tiny, small, base or large."


def model_info_cmd(
    size: Annotated[str, typer.Option("--size", help=SIZE_HELP)] = "base",
    frames: Annotated[int, typer.Option("--frames", min=1, help="Frames per clip (T).")] = 8,
    img_size: Annotated[
        int, typer.Option("--img-size", min=16, help="Frame height = width (multiple of 16).")
    ] = 224,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON object instead of a table.")
    ] = False,
):
    """Print parameters per stream and in total, and GFLOPs per view (attention counted)."""
    from imdpipe.heads.info import model_info

    try:
        info = model_info(size=size, frames=frames, img_size=img_size)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    if as_json:
        typer.echo(json.dumps(info))
        return

    from rich.console import Console
    from rich.table import Table

    paper = info["paper"]
    table = Table(title=f"IMD model, size {size}, {frames} frames, {img_size}x{img_size} (full IMD model)")
    table.add_column("quantity")
    table.add_column("ours", justify="right")
    table.add_column("paper (suppl. Table 4)", justify="right")

    def paper_params() -> str:
        return f"{paper['params_per_stream'] / 1e6:.1f}M" if paper else "-"

    for name, n in info["params_per_stream"].items():
        table.add_row(f"params, {name} stream", f"{n / 1e6:.2f}M", paper_params())
    table.add_row(
        "params, total",
        f"{info['params_total'] / 1e6:.2f}M",
        f"{2 * paper['params_per_stream'] / 1e6:.1f}M (2 streams)" if paper else "-",
    )
    table.add_row(
        "GFLOPs per view",
        f"{info['gflops_per_view']:.1f}",
        f"{paper['gflops_per_view']:.1f} ({paper['gflops_multi_view']:,.0f} / {paper['views']} views)"
        if paper
        else "-",
    )
    console = Console()
    console.print(table)
    console.print(
        "FLOPs count a multiply-add as 2; the paper does not state its convention. "
        "Sizes and differences: imdpipe/heads/visual.py."
    )
