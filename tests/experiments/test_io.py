"""Atomic writes and tamper-evident checkpoints (varred_diffusion.experiments.io)."""

from __future__ import annotations

import builtins
import csv
import hashlib
import io
import json

import pytest
import torch

from varred.errors import VarRedError
from varred_diffusion.experiments.io import (
    atomic_write_bytes,
    get_generator_states,
    load_checkpoint,
    save_checkpoint,
    save_figure,
    set_generator_states,
    write_csv,
    write_json,
    write_markdown,
)


def _no_temp_files(d):
    return [p.name for p in d.iterdir() if p.name.endswith(".tmp")] == []


def test_atomic_writers_roundtrip(tmp_path):
    write_json(tmp_path / "a.json", {"x": torch.tensor([1.5, 2.0]), "nan": float("nan"), "n": 3})
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": [1.5, 2.0], "nan": None, "n": 3}
    write_csv(tmp_path / "b.csv", [{"a": 1, "b": 0.5}, {"a": 2, "c": "z"}])
    rows = list(csv.DictReader((tmp_path / "b.csv").open()))
    assert rows == [{"a": "1", "b": "0.5", "c": ""}, {"a": "2", "b": "", "c": "z"}]
    write_markdown(tmp_path / "c.md", "# hi")
    assert (tmp_path / "c.md").read_text() == "# hi\n"
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([0, 1])
    save_figure(tmp_path / "sub" / "d.png", fig)
    assert (tmp_path / "sub" / "d.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert _no_temp_files(tmp_path)


def test_atomic_write_failure_keeps_old_file(tmp_path, monkeypatch):
    target = tmp_path / "f.txt"
    atomic_write_bytes(target, b"old")

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("os.replace", boom)
    with pytest.raises(OSError):
        atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"old"
    assert _no_temp_files(tmp_path)


def test_checkpoint_roundtrip_and_generator_states(tmp_path, generator):
    g2 = torch.Generator().manual_seed(7)
    states = get_generator_states({"a": generator, "b": g2})
    expected = (torch.rand(3, generator=generator), torch.rand(3, generator=g2))
    state = {
        "w": torch.arange(6.0).reshape(2, 3),
        "step": 5,
        "log": [{"loss": 1.0}],
        "gens": states,
    }
    save_checkpoint(tmp_path / "c.ckpt", state)
    got = load_checkpoint(tmp_path / "c.ckpt")
    assert torch.equal(got["w"], state["w"]) and got["step"] == 5 and got["log"] == [{"loss": 1.0}]
    set_generator_states({"a": generator, "b": g2}, got["gens"])
    assert torch.equal(torch.rand(3, generator=generator), expected[0])
    assert torch.equal(torch.rand(3, generator=g2), expected[1])
    with pytest.raises(VarRedError, match="'c'"):
        set_generator_states({"c": g2}, got["gens"])


@pytest.mark.parametrize("damage", ["flip", "truncate", "append", "magic", "header"])
def test_damaged_checkpoint_raises(tmp_path, damage):
    path = tmp_path / "c.ckpt"
    save_checkpoint(path, {"w": torch.ones(100)})
    raw = bytearray(path.read_bytes())
    if damage == "flip":
        raw[-10] ^= 0xFF
    elif damage == "truncate":
        raw = raw[: len(raw) // 2]
    elif damage == "append":
        raw += b"junk"
    elif damage == "magic":
        raw[:3] = b"XYZ"
    else:
        nl = raw.index(b"\n")
        raw[nl + 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(VarRedError, match=r"c\.ckpt"):
        load_checkpoint(path)


class _Evil:
    def __reduce__(self):
        return (exec, ("import builtins; builtins._VARRED_PWNED = True",))


def test_malicious_payload_with_valid_checksum_is_refused(tmp_path):
    buf = io.BytesIO()
    torch.save({"x": _Evil()}, buf)
    payload = buf.getvalue()
    header = {"format": "varred-checkpoint-v1", "size": len(payload),
              "sha256": hashlib.sha256(payload).hexdigest()}  # fmt: skip
    path = tmp_path / "evil.ckpt"
    path.write_bytes(b"VARRED-CKPT\n" + json.dumps(header).encode() + b"\n" + payload)
    with pytest.raises(VarRedError, match="cannot be loaded safely"):
        load_checkpoint(path)
    assert not hasattr(builtins, "_VARRED_PWNED")


def test_missing_checkpoint(tmp_path):
    with pytest.raises(VarRedError, match="cannot be read"):
        load_checkpoint(tmp_path / "nope.ckpt")


def test_plus_minus_formats_missing_values() -> None:
    from varred_diffusion.experiments.io import plus_minus

    assert plus_minus(0.3312, 0.0214) == "0.331 ± 0.021"
    assert plus_minus(0.3312, float("nan")) == plus_minus(0.3312, None) == "0.331"
    assert plus_minus(float("nan"), float("nan")) == plus_minus(None, None) == "–"
