"""End-to-end smoke tests of ``varred-repro`` at ``--quick`` sizes, determinism and resume."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from varred_diffusion.experiments.cli import main
from varred_diffusion.experiments.data import candidate_data_dirs, find_data_dir
from varred_diffusion.experiments.io import load_checkpoint

EXPECTED = {
    "toy": [
        "fig1_convergence.png",
        "fig2_variance_ratio.png",
        "fig1_curves.csv",
        "fig2_vr_sigma.csv",
    ],
    "grid": ["fig5_grid.png", "fig5_grid.csv"],
    "optimizers": ["fig4_optimizers.png", "fig4_optimizers.csv"],
    "mnist": ["fig3_mnist.png", "fig3_samples.png", "fig3_vr.csv"],
    "leaderboard": ["leaderboard.csv"],
}


def _has_mnist() -> bool:
    try:
        find_data_dir()
    except ValueError:
        return False
    return True


def _numbers(obj):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _numbers(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _numbers(v)
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        yield float(obj)


def _run(name: str, out: Path, *extra: str) -> dict:
    assert main([name, "--quick", "--no-progress", "--out", str(out), *extra]) == 0
    for f in [*EXPECTED[name], "results.json", "summary.md", "timings.json"]:
        assert (out / f).is_file(), f
    return json.loads((out / "results.json").read_text())


@pytest.mark.parametrize("name", ["grid", "optimizers", "mnist", "leaderboard"])
def test_subcommand_smoke(name, tmp_path):
    if name == "mnist" and not _has_mnist():
        pytest.skip(f"no IDX data in {candidate_data_dirs()}")
    res = _run(name, tmp_path / name)
    nums = list(_numbers(res))
    assert nums and all(math.isfinite(v) for v in nums)
    for path in (tmp_path / name).glob("*.csv"):
        assert len(list(csv.DictReader(path.open()))) > 0


def test_toy_deterministic_and_finite(tmp_path):
    a = _run("toy", tmp_path / "a", "--seed", "3")
    b = _run("toy", tmp_path / "b", "--seed", "3")
    assert a == b
    assert all(math.isfinite(v) for v in _numbers(a))
    assert a["fig2_vr_sigma"][0]["vr_element"] < 1.0


def test_seed_changes_numbers(tmp_path):
    a = _run("optimizers", tmp_path / "a", "--seed", "1")
    assert a == _run("optimizers", tmp_path / "b", "--seed", "1")
    assert a != _run("optimizers", tmp_path / "c", "--seed", "2")


def _complete(path: Path) -> None:
    """Every visible output file parses completely (temporary files are hidden)."""
    if path.suffix == ".json":
        json.loads(path.read_text())
    elif path.suffix == ".csv":
        list(csv.DictReader(path.open()))
    elif path.suffix == ".ckpt":
        load_checkpoint(path)
    elif path.suffix == ".png":
        raw = path.read_bytes()
        assert (
            raw.startswith(b"\x89PNG")
            and raw[-12:-8] == b"\x00\x00\x00\x00"
            and b"IEND" in raw[-8:]
        )
    elif path.suffix == ".md":
        assert path.read_text().endswith("\n")


def test_sigkill_then_resume_matches_uninterrupted(tmp_path):
    # the toy trains with the C^0 recipe step: the checkpoint must carry the running β statistics
    args = ["toy", "--quick", "--no-progress", "--steps", "16", "--checkpoint-every", "2"]
    out = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "varred_diffusion.experiments.cli", *args, "--out", str(out)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if (out / "checkpoints" / "toy-seed0-cv.ckpt").exists():  # mid-way through a CV job
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (out / "results.json").exists()
    for path in out.rglob("*"):
        if path.is_file() and not path.name.startswith("."):
            _complete(path)
    assert main([*args, "--out", str(out), "--resume"]) == 0
    resumed = json.loads((out / "results.json").read_text())
    ref = tmp_path / "ref"
    assert main([*args[:-2], "--out", str(ref)]) == 0
    assert resumed == json.loads((ref / "results.json").read_text())


def test_resume_with_tampered_checkpoint_fails_cleanly(tmp_path, capsys):
    args = ["optimizers", "--quick", "--no-progress", "--steps", "4", "--checkpoint-every", "2"]
    out = tmp_path / "t"
    assert main([*args, "--out", str(out)]) == 0
    ckpt = out / "checkpoints" / "opt-adam.done.ckpt"
    raw = bytearray(ckpt.read_bytes())
    raw[-20] ^= 0x01
    ckpt.write_bytes(bytes(raw))
    assert main([*args, "--out", str(out), "--resume"]) == 2
    assert "sha256" in capsys.readouterr().err
    ckpt.write_bytes(bytes(raw[:100]))
    assert main([*args, "--out", str(out), "--resume"]) == 2
    # a checkpoint made for other settings is refused, not silently restarted
    assert main([*args[:4], "6", *args[5:], "--out", str(tmp_path / "u")]) == 0
    assert main([*args, "--out", str(tmp_path / "u"), "--resume"]) == 2
    assert main([*args[:4], "6", *args[5:], "--out", str(tmp_path / "u"), "--resume"]) == 0
    assert (
        main([*args[:4], "6", *args[5:], "--seed", "9", "--out", str(tmp_path / "u"), "--resume"])
        == 2
    )
