"""What a process under torchrun / Slurm takes from its environment: option names torchrun's
parser leaves alone, cores per process, its GPU, its shard, and the CUDA RNG state it saves."""

from __future__ import annotations

import pytest
import torch

from imdpipe import launch
from imdpipe.devices import select_device


# ---------------------------------------------------------------------------------------------
# Every command launches under torchrun with the arguments it takes alone
# ---------------------------------------------------------------------------------------------
def _torchrun_parser():
    from torch.distributed.run import get_args_parser

    return get_args_parser()


def _our_options():
    """``{command: [(long option, takes a value), ...]}`` of every registered command."""
    import click
    import typer

    from imdpipe.cli.main import app

    root = typer.main.get_command(app)
    out = {}
    for name, cmd in root.commands.items():
        opts = []
        for p in cmd.params:
            if isinstance(p, click.Option):
                takes_value = not (p.is_flag or p.count)
                opts += [(o, takes_value) for o in p.opts + p.secondary_opts if o.startswith("--")]
        out[name] = opts
    return out


def test_no_option_is_a_prefix_of_a_torchrun_option():
    """argparse (allow_abbrev) reads an option that starts a torchrun option as that option.

    An exact match (``--help``) is not an abbreviation: torchrun's REMAINDER keeps it for the
    script; the parse test below checks that for every option.
    """
    theirs = sorted({o for a in _torchrun_parser()._actions for o in a.option_strings if o.startswith("--")})
    assert "--run-path" in theirs and "--nproc-per-node" in theirs  # the parser we mean
    commands = _our_options()
    assert {"train", "evaluate", "predict", "extract-flow", "extract-audio"} <= set(commands)
    clashes = {f"{cmd} {opt}": [t for t in theirs if t.startswith(opt) and t != opt]
               for cmd, opts in commands.items() for opt, _ in opts}
    clashes = {k: v for k, v in clashes.items() if v}
    assert not clashes, f"options torchrun would read as abbreviations of its own: {clashes}"


def test_torchrun_passes_every_option_of_every_command_through():
    parser = _torchrun_parser()
    for cmd, opts in _our_options().items():
        args = []
        for opt, takes_value in opts:
            args += [opt, "1"] if takes_value else [opt]
        parsed = parser.parse_args(["--nproc_per_node", "2", "-m", "imdpipe", cmd, *args])
        assert parsed.module and parsed.training_script == "imdpipe"
        assert parsed.training_script_args == [cmd, *args], cmd


def test_the_old_run_option_is_what_broke():
    """The check above would catch it: ``--run`` is ambiguous for torchrun."""
    with pytest.raises(SystemExit):
        _torchrun_parser().parse_args(["--nproc_per_node", "2", "-m", "imdpipe", "evaluate", "--run", "x"])


# ---------------------------------------------------------------------------------------------
# Cores, shards and devices per process
# ---------------------------------------------------------------------------------------------
def test_cores_per_process_divides_by_local_world_size(monkeypatch):
    monkeypatch.setattr(launch, "available_cores", lambda: 64)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert launch.cores_per_process() == 64
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert launch.cores_per_process() == 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")
    assert launch.cores_per_process() == 21
    monkeypatch.setattr(launch, "available_cores", lambda: 2)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert launch.cores_per_process() == 1  # never 0
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "eight")
    with pytest.raises(ValueError, match="LOCAL_WORLD_SIZE"):
        launch.cores_per_process()


def test_stage_worker_defaults_follow_local_world_size(monkeypatch):
    from imdpipe.pipeline.audio import default_workers

    monkeypatch.setattr(launch, "available_cores", lambda: 16)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert default_workers(torch.device("cuda", 0)) == 2
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert default_workers(torch.device("cuda", 0)) == 4  # capped: 4 keep a GPU fed
    assert default_workers(torch.device("cpu")) == 0  # inline on CPU, whatever the cores


def test_shard_from_torchrun_then_slurm_array(monkeypatch):
    from imdpipe.pipeline.store import Partition

    for k in ("WORLD_SIZE", "RANK", "SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_MIN"):
        monkeypatch.delenv(k, raising=False)
    assert Partition.parse(None) == Partition(0, 1)
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "5")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "8")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "1")  # --array=1-8
    assert Partition.parse(None) == Partition(4, 8)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert Partition.parse(None) == Partition(1, 2)  # torchrun wins
    assert Partition.parse("3/4") == Partition(3, 4)  # and --shard over both


class _FakeCuda:
    """Stands in for torch.cuda's device calls on this GPU-less machine and records them."""

    def __init__(self, monkeypatch):
        self.calls = []
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "set_device", lambda d: self.calls.append(("set_device", torch.device(d))))
        monkeypatch.setattr(torch.cuda, "get_rng_state",
                            lambda device="cuda": self.calls.append(("get_rng_state", torch.device(device)))
                            or torch.tensor([7], dtype=torch.uint8))
        monkeypatch.setattr(torch.cuda, "get_rng_state_all",
                            lambda: self.calls.append(("get_rng_state_all",)) or [])
        monkeypatch.setattr(torch.cuda, "set_rng_state",
                            lambda state, device="cuda": self.calls.append(("set_rng_state", torch.device(device))))


def test_cuda_means_the_local_rank_gpu_made_current(monkeypatch):
    cuda = _FakeCuda(monkeypatch)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert select_device("cuda") == torch.device("cuda", 3)
    assert select_device(None) == torch.device("cuda", 3)
    assert select_device("cuda:1") == torch.device("cuda", 1)  # an explicit index is kept
    assert cuda.calls == [("set_device", torch.device("cuda", 3))] * 2 + [("set_device", torch.device("cuda", 1))]
    assert select_device("cpu") == torch.device("cpu")


def test_extract_audio_resolves_its_device_per_local_rank(monkeypatch):
    from imdpipe.pipeline import audio

    cuda = _FakeCuda(monkeypatch)
    monkeypatch.setenv("LOCAL_RANK", "1")
    # load_audio_model resolves the device before anything touches it
    monkeypatch.setattr("transformers.ASTForAudioClassification.from_pretrained",
                        lambda *a, **k: (_ for _ in ()).throw(OSError("offline")))
    with pytest.raises(audio.ModelUnavailable):
        audio.load_audio_model("/nonexistent/ast", device="cuda")
    with pytest.raises(audio.ModelUnavailable):
        audio.load_audio_model("/nonexistent/ast", device=None)
    assert cuda.calls == [("set_device", torch.device("cuda", 1))] * 2


def test_no_gpu_asked_for_cuda_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="--device cpu"):
        select_device("cuda")
    assert select_device("auto") == torch.device("cpu")


def test_checkpoint_rng_holds_only_the_local_gpu_state(monkeypatch):
    from imdpipe.train.runtime import rng_states, set_rng_states

    cuda = _FakeCuda(monkeypatch)
    states = rng_states(torch.device("cuda", 2))
    assert cuda.calls == [("get_rng_state", torch.device("cuda", 2))]
    assert states["cuda"].tolist() == [7]
    set_rng_states(states, torch.device("cuda", 2))
    assert cuda.calls[-1] == ("set_rng_state", torch.device("cuda", 2))
    # a checkpoint written before (one state per visible GPU) restores this rank's entry
    old = dict(states, cuda=[torch.tensor([1], dtype=torch.uint8), torch.tensor([2], dtype=torch.uint8)])
    set_rng_states(old, torch.device("cuda", 1))
    assert cuda.calls[-1] == ("set_rng_state", torch.device("cuda", 1))
    assert not any(c[0] == "get_rng_state_all" for c in cuda.calls)
    assert "cuda" not in rng_states(torch.device("cpu"))
