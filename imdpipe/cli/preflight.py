"""Before the Makefile's reproduction targets start: are the models they need on this machine?

``python -m imdpipe.cli.preflight VAR=KIND:VALUE ...`` (KIND is ``text``, ``audio`` or ``init``)
checks that each model is a local path or, for a hub id / timm name, already in the local
Hugging Face cache (the Makefile runs everything with ``HF_HUB_OFFLINE=1``), and stops with one
message naming the Makefile variables to set. It reads no weights.
"""

from __future__ import annotations

import sys
from pathlib import Path

FIXES = {
    "text": "a directory saved with save_pretrained (e.g. `huggingface-cli download bert-base-uncased "
            "--local-dir DIR` on a machine with network)",
    "audio": "a directory saved with save_pretrained (e.g. `huggingface-cli download "
             "MIT/ast-finetuned-audioset-10-10-0.4593 --local-dir DIR` on a machine with network)",
    "init": "a timm ViT file (.safetensors/.pth/.npz, e.g. timm's model.safetensors of that name), an imdpipe "
            "run directory, or `none` to train from scratch",
}


def hub_repo(kind: str, value: str) -> str:
    """The hub repository a model name is fetched from (timm names live under ``timm/``)."""
    if kind != "init":
        return value
    import timm.models

    cfg = timm.models.get_pretrained_cfg(value)
    if cfg is None or not cfg.hf_hub_id:
        raise ValueError(f"{value!r} is not a timm pretrained name")
    return cfg.hf_hub_id.split("@")[0]


def problem(kind: str, value: str) -> str | None:
    """Why ``value`` cannot be used offline, or None when it can."""
    if not value:
        return "is empty"
    if kind == "init" and value == "none":
        return None
    if Path(value).expanduser().exists():
        return None
    if value.startswith((".", "/", "~")):
        return f"{value}: no such file or directory"
    try:
        repo = hub_repo(kind, value)
        from huggingface_hub import snapshot_download

        snapshot_download(repo, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - any failure means: not usable offline
        return f"{value}: not a local path and not in the Hugging Face cache ({type(e).__name__})"
    return None


def main(argv: list[str]) -> int:
    lines = []
    for arg in argv:
        var, _, spec = arg.partition("=")
        kind, _, value = spec.partition(":")
        if kind not in FIXES:
            raise SystemExit(f"preflight: expected VAR=KIND:VALUE with KIND in {sorted(FIXES)}, got {arg!r}")
        why = problem(kind, value)
        if why is not None:
            lines.append(f"  {var} {why}.\n    Set {var}=... to {FIXES[kind]}.")
    if lines:
        print("make: the reproduction runs offline (HF_HUB_OFFLINE=1) and these models are not on this machine:\n"
              + "\n".join(lines), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
