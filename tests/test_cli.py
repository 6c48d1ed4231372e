"""The ``gptfn`` command as a user runs it: real subprocesses, tiny data, a few steps.

Each behaviour is seen at least once through the real command (exit statuses, what is printed,
signals, files on disk); follow-up checks of the same behaviour call ``gptfn.cli.main``
in-process, which skips the ~1.5 s import of a new process. Option checking in bulk is in
test_train_config.py.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import stat
import subprocess
import sys
from pathlib import Path

import optree
import pytest
import torch
from safetensors.torch import load_file

from gptfn.checkpoint import load_run, read_meta
from gptfn.cli import main
from gptfn.data import prepare, shakespeare

SCRIPT = Path(sys.executable).with_name("gptfn")  # the command installed beside this Python
GPTFN = [str(SCRIPT)] if SCRIPT.is_file() else [sys.executable, "-m", "gptfn"]
TINY = [
    "--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "16",
    "--batch-size", "4", "--eval-steps", "2", "--log-interval", "1", "--warmup-steps", "2",
    "--no-progress", "--sample-tokens", "0",
]  # fmt: skip
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def gptfn(*args: str) -> subprocess.CompletedProcess:
    """Run ``gptfn ARGS`` to the end; returns the CompletedProcess (text out and err)."""
    return subprocess.run([*GPTFN, *args], capture_output=True, text=True, timeout=180, env=ENV)


def run_all(*commands: list[str]) -> list[str]:
    """Run several ``gptfn`` commands at once (the machine has 2 cores); their stdouts."""
    procs = [start(*c) for c in commands]
    outs = [p.communicate(timeout=180) for p in procs]
    for (_, err), p in zip(outs, procs):
        assert p.returncode == 0, err
    return [out for out, _ in outs]


def start(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [*GPTFN, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV
    )


def wait_for(proc: subprocess.Popen, prefix: str) -> None:
    """Read the process's output until a line starts with ``prefix``."""
    for line in proc.stdout:
        if line.startswith(prefix):
            return
    raise AssertionError(f"the run ended before printing {prefix!r}: {proc.stderr.read()}")


def steps_logged(run: Path) -> list[int]:
    return [json.loads(x)["step"] for x in (run / "log.jsonl").read_text().splitlines()]


def test_train_refuses_to_replace_a_run_and_overwrite_starts_afresh(data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    umask = os.umask(0o027)
    try:  # in-process (quicker); the two runs below are real commands
        assert (
            main(["train", "--data", str(data_dir), "--out", str(run), *TINY, "--max-steps", "3"])
            == 0
        )
    finally:
        os.umask(umask)
    printed = capsys.readouterr().out
    assert "step 1/3: loss" in printed  # --no-progress prints the log lines
    assert "step 3/3: loss" in printed and "val loss" in printed
    for name in ("last.safetensors", "best.safetensors", "log.jsonl"):  # the user's umask
        assert stat.S_IMODE((run / name).stat().st_mode) == 0o640, name
    before = (run / "last.safetensors").read_bytes()

    again = gptfn("train", "--data", str(data_dir), "--out", str(run), *TINY, "--max-steps", "2")
    assert again.returncode == 1
    assert "already holds a run at step 3" in again.stderr
    assert all(x in again.stderr for x in ("--resume", "--overwrite", "--out"))
    assert (run / "last.safetensors").read_bytes() == before and steps_logged(run) == [1, 2, 3]

    fresh = gptfn("train", "--data", str(data_dir), "--out", str(run), *TINY, "--max-steps", "2",
                  "--overwrite")  # fmt: skip
    assert fresh.returncode == 0, fresh.stderr
    assert read_meta(run / "last.safetensors")["step"] == 2 and steps_logged(run) == [1, 2]


def test_prepare_refuses_to_replace_prepared_data(tmp_path):
    text = tmp_path / "a.txt"
    text.write_text(shakespeare()[:5_000])
    out = tmp_path / "data"
    prepare(text, out)
    before = (out / "train.bin").read_bytes()
    text.write_text(shakespeare()[5_000:10_000])
    again = gptfn("prepare", "--input", str(text), "--out", str(out))
    assert again.returncode == 1 and "already holds prepared data" in again.stderr
    assert "--overwrite" in again.stderr and (out / "train.bin").read_bytes() == before
    assert main(["prepare", "--input", str(text), "--out", str(out), "--overwrite"]) == 0
    assert (out / "train.bin").read_bytes() != before


def test_sigint_and_sigterm_save_and_the_resumed_run_is_bit_identical(data_dir, tmp_path):
    args = ["train", "--data", str(data_dir), *TINY, "--max-steps", "50", "--eval-interval", "20",
            "--dropout", "0.1"]  # fmt: skip
    straight = start(*args, "--out", str(tmp_path / "straight"))
    run = tmp_path / "run"
    interrupted = start(*args, "--out", str(run))
    wait_for(interrupted, "step 5/")
    interrupted.send_signal(signal.SIGINT)
    _, err = interrupted.communicate(timeout=60)
    assert interrupted.returncode == 130, err
    assert "Traceback" not in err and "interrupted by SIGINT: saved step" in err
    first_stop = read_meta(run / "last.safetensors")["step"]
    assert 5 <= first_stop < 50
    command = shlex.split(err.split("resume with: ")[1].splitlines()[0])
    assert command[0] == "gptfn" and command[-1] == "--resume"

    resumed = start(*command[1:])
    wait_for(resumed, f"step {first_stop + 3}/")
    resumed.send_signal(signal.SIGTERM)
    _, err = resumed.communicate(timeout=60)
    assert resumed.returncode == 143 and "interrupted by SIGTERM: saved step" in err
    assert first_stop + 3 <= read_meta(run / "last.safetensors")["step"] < 50

    final = gptfn(*command[1:])
    assert final.returncode == 0 and "resuming from" in final.stdout, final.stderr
    straight.communicate(timeout=120)
    assert straight.returncode == 0
    a, b = (
        load_file(tmp_path / "straight" / "last.safetensors"),
        load_file(run / "last.safetensors"),
    )
    assert a.keys() == b.keys() and any(k.startswith("opt.") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)  # params and optimizer state, bit for bit
    assert steps_logged(run) == list(range(1, 51))  # no step logged twice


def test_options_reach_the_run_and_risky_ones_warn(data_dir, tmp_path):
    run = tmp_path / "run"
    out = gptfn("train", "--data", str(data_dir), "--out", str(run), *TINY, "--max-steps", "2",
                "--warmup-steps", "5", "--dtype", "float16", "--no-tie-embeddings",
                "--optimizer", "muon", "--muon-lr", "0.05")  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "gptfn: warning: --dtype float16 on a CPU is ~20x slower" in out.stderr
    assert "gptfn: warning: --max-steps (2) <= --warmup-steps (5)" in out.stderr
    params, _, meta = load_run(run)
    assert "unembed" in params and meta["model"]["tie_embeddings"] is False
    assert meta["train"]["muon_lr"] == 0.05 and "extra" not in meta["train"]


def test_bad_values_exit_2_naming_option_value_and_allowed(tmp_path):
    out = gptfn("train", "--out", str(tmp_path / "r"), "--eval-interval", "0")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "argument --eval-interval: invalid value '0': must be >= 1" in out.stderr
    config = tmp_path / "bad.toml"
    config.write_text("[optimizer]\nlr = 'fast'\n")
    out = gptfn("train", "--out", str(tmp_path / "r"), "--config", str(config))
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert f"{config}: lr: invalid value 'fast': expected a number" in out.stderr


def test_help_has_a_line_per_option_and_the_choices(capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", "--help"])
    assert info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for choices in ("module.path:function", "{float32,bfloat16,float16}", "{cpu,cuda,mps}"):
        assert choices in text
    from gptfn.train import TrainConfig

    for section, cls in TrainConfig.SECTIONS.items():
        assert f"{section} options" in text
        for f in __import__("dataclasses").fields(cls):
            flag = "--" + f.name.replace("_", "-")
            assert flag in text and " ".join(f.metadata["help"].split()) in text, flag
    assert "~20x slower" in text and "(default: " in text


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
    """A 6-step run (in-process: quicker) whose best.safetensors is not its last."""
    from gptfn.checkpoint import save_checkpoint
    from gptfn.train import TrainConfig, train

    run = tmp_path_factory.mktemp("trained") / "run"
    options = dict(data=str(data_dir), out=str(run), n_layer=1, n_head=2, n_embd=16)
    options |= dict(block_size=16, batch_size=4, max_steps=6, eval_interval=3, eval_steps=2)
    train(TrainConfig.from_dict(options | dict(progress=False, warmup_steps=2, lr=0.01)))
    params, _, meta = load_run(run)
    other = optree.tree_map(lambda x: x * 0.5, params)
    save_checkpoint(run / "best.safetensors", other, None, meta | {"step": 3})
    return run


def test_sample_stream_and_checkpoint_choice(trained, capsys):
    sample = ["sample", "--run", str(trained), "--prompt", "ROMEO:", "--num-samples", "3",
              "--seed", "1", "--max-new-tokens", "12"]  # fmt: skip
    streamed, plain = run_all([*sample, "--stream"], sample)
    samples = [s.strip() for s in streamed.split("-" * 40) if s.strip()]
    assert len(samples) == 3 and len(set(samples)) == 3  # one seed, three different samples
    assert streamed == plain  # streaming prints the same text
    # in-process from here (quicker): which checkpoint sample and eval read
    assert main([*sample, "--checkpoint", "best"]) == 0
    assert capsys.readouterr().out != plain
    assert main(["eval", "--run", str(trained), "--json", "--checkpoint", "best"]) == 0
    assert json.loads(capsys.readouterr().out)["step"] == 3


def test_plot_of_an_empty_log_says_so(trained, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "log.jsonl").write_text("")
    out = gptfn("plot", str(empty))
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "no records yet" in out.stderr
    assert main(["plot", str(trained), "--out", str(tmp_path / "c.png")]) == 0
    assert (tmp_path / "c.png").stat().st_size > 1000


def test_python_dash_m_entry_point():
    out = subprocess.run(
        [sys.executable, "-m", "gptfn", "--help"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0
    assert all(cmd in out.stdout for cmd in ("prepare", "train", "sample", "eval", "plot"))


def test_readme_says_what_the_install_line_installs():
    root = Path(__file__).resolve().parents[1]
    readme = root / "README.md"
    text = " ".join(readme.read_text().split())
    assert "pip install torch --index-url https://download.pytorch.org/whl/cpu" in text
    assert "pip install torch==" not in text  # no exact pin that means CUDA from PyPI
    assert "float16" in text and "~20x slower than float32" in text
    floor = next(
        line.split(">=")[1].strip('",')
        for line in (root / "pyproject.toml").read_text().split()
        if line.startswith('"torch>=')
    )
    assert f"PyTorch {floor} or newer (tested: {floor}.0, the oldest" in text
