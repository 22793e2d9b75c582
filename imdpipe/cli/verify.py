"""``imdpipe verify``: find (and with --repair, clear) missing or damaged chunks in a cache's stores."""

from __future__ import annotations

from typing import Annotated

import typer

from imdpipe.cli.options import CacheOpt, cli_errors


def verify_cmd(
        cache: CacheOpt,
        repair: Annotated[bool, typer.Option(
            "--repair", help="Mark every damaged video not done and reset its entries, so the next run of "
                             "the stage that built the store recomputes exactly those videos (the command "
                             "is printed). Shards a running stage holds are left alone.")] = False,
):
    """Check every store of a cache: each done video's chunks exist and pass their checksum.

    Prints a table per store (missing, truncated, corrupt chunks, unreadable flags) and the damaged
    videos. Exits 1 when damage is found without --repair, or when --repair could not fix all of it
    (a store built without checksums, a damaged savld.zarr, a shard held by a running stage).
    """
    from rich.console import Console

    from imdpipe.pipeline.integrity import print_report, verify_cache

    console = Console(stderr=True)
    with cli_errors():
        report = verify_cache(cache, repair=repair)
    print_report(report, console)
    if report.unresolved:
        raise typer.Exit(code=1)
