"""State files: no pickle is ever executed, damage is detected and named, damaged resume state is
redone (never reused, never fatal)."""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
from pathlib import Path

import pytest
import torch

from conftest import AUGMENT, make_toy_store, method_settings
from histodistill.data.real import RealData
from histodistill.data.store import PatchStore
from histodistill.distill import Context, build
from histodistill.state import Checkpoint
from histodistill.io import InputError
from histodistill.state import HEADER, MAGIC, StateError, load_resume, load_state, save_state

DM = method_settings("dm", net="convnet", net_kwargs={"width": 8, "norm": "none"}, iterations=4,
                     lr_img=1.0, batch_real=8, augment={**AUGMENT, "preset": "dsa"}, checkpoint_every=1)


class Planted:
    """What an attacker writes: unpickling it runs a shell command (it creates ``marker``)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (os.system, (f"touch {self.marker}",))


def plant(path: Path, marker: Path, headed: bool) -> None:
    """A malicious pickle at ``path``: a plain torch file, or one behind a valid header and
    checksum (an attacker who knows the format)."""
    buf = io.BytesIO()
    torch.save({"key": "k", "x": Planted(marker)}, buf)
    payload = buf.getvalue()
    path.parent.mkdir(parents=True, exist_ok=True)
    if headed:
        head = b"%s %s %016d\n" % (MAGIC, hashlib.sha256(payload).hexdigest().encode(), len(payload))
        assert len(head) == HEADER
        payload = head + payload
    path.write_bytes(payload)


def test_a_state_round_trips_tensors_and_plain_data(tmp_path):
    state = {"w": torch.randn(7, 3), "n": 3, "x": [1.5, (2, "a")], "none": None,
             "gen": torch.Generator().manual_seed(1).get_state()}
    save_state(state, tmp_path / "s.pt")
    back = load_state(tmp_path / "s.pt")
    assert torch.equal(back["w"], state["w"]) and back["x"] == [1.5, (2, "a")]
    assert torch.equal(back["gen"], state["gen"]) and back["none"] is None
    assert [p.name for p in tmp_path.iterdir()] == ["s.pt"]  # no temporary left


@pytest.mark.parametrize("headed", [False, True])
def test_a_planted_pickle_is_refused_and_nothing_runs(tmp_path, headed):
    marker = tmp_path / "pwned"
    plant(tmp_path / "s.pt", marker, headed)
    reason = "other than tensors and plain data.*posix.system" if headed else "not a histodistill state"
    with pytest.raises(StateError, match=reason):
        load_state(tmp_path / "s.pt")
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["truncate", "flip", "extend", "empty", "header", "length"])
def test_damage_is_detected_and_named(tmp_path, damage):
    path = tmp_path / "s.pt"
    save_state({"w": torch.arange(1000.0)}, path)
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[:-50]
    elif damage == "flip":
        data[-200] ^= 0xFF
    elif damage == "extend":
        data += b"\0"
    elif damage == "empty":
        data = bytearray()
    elif damage == "length":
        data[HEADER - 5:HEADER - 1] = b"x" * 4
    else:
        data[3] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(StateError, match=str(path).replace(".", r"\.")):
        load_state(path)


def _loaders():
    """Every reader of a state file another rule wrote, with that rule."""
    from histodistill.distill.run import context
    from histodistill.encoders import load_encoder
    from histodistill.generate.autoencoder import load_autoencoder, AutoencoderKL
    from histodistill.generate.generator import load_uvit
    from histodistill.generate.histodiffusion import apply_decoder, load_classifier

    cpu = torch.device("cpu")
    return {
        "pretrain_pool": lambda p, store: context(store, None, p, 0, cache_mb=64, progress=False),
        "train_encoder": lambda p, store: load_encoder(p, cpu),
        "train_autoencoder": lambda p, store: load_autoencoder(p, cpu),
        "train_generator": lambda p, store: load_uvit(p, cpu),
        "train_latent_classifier": lambda p, store: load_classifier(p, cpu),
        "finetune_decoder": lambda p, store: apply_decoder(AutoencoderKL.__new__(AutoencoderKL), p),
    }


@pytest.mark.parametrize("rule", list(_loaders()))
@pytest.mark.parametrize("headed", [False, True])
def test_every_model_file_reader_refuses_a_planted_pickle_naming_file_and_rule(tmp_path, rule,
                                                                                headed):
    store = make_toy_store(tmp_path / "p.zarr")
    marker, path = tmp_path / "pwned", tmp_path / f"{rule}.pt"
    plant(path, marker, headed)
    with pytest.raises(InputError, match=rf"\[{rule}\] .*{path.name}: .*rerun rule {rule}"):
        _loaders()[rule](path, store)
    assert not marker.exists()


def _distill(store, ckpt=None):
    real = RealData(PatchStore(store), "train", 64, 0, torch.device("cpu"))
    return build("dm", DM, 2, Context(real, 0, None, ckpt, {}, progress=False))


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncate", "planted", "planted_headed", "garbage"])
def test_damaged_distillation_checkpoint_is_logged_and_redone_to_the_clean_result(
        tmp_path, caplog, damage):
    store = make_toy_store(tmp_path / "p.zarr")
    reference, _ = _distill(store).run()
    ckpt, marker = tmp_path / "dm.ckpt", tmp_path / "pwned"
    _distill(store, ckpt).run(stop_after=2)
    if damage == "truncate":
        ckpt.write_bytes(ckpt.read_bytes()[:-100])
    elif damage == "garbage":
        ckpt.write_bytes(b'{"not": "a checkpoint"')
    else:
        plant(ckpt, marker, damage == "planted_headed")
    with caplog.at_level(logging.WARNING, logger="histodistill.state"):
        resumed, _ = _distill(store, ckpt).run()
    torch.testing.assert_close(resumed, reference, rtol=0, atol=1e-6)
    assert not marker.exists()
    assert any(str(ckpt) in r.getMessage() and "redoing" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("damage", ["truncate", "planted_headed"])
def test_damaged_checkpoint_starts_afresh(tmp_path, damage):
    net = torch.nn.Linear(2, 2)
    ckpt = Checkpoint(tmp_path / "e.ckpt", "k")
    ckpt.save({"net": net.state_dict(), "epoch": 1})
    assert ckpt.load()["epoch"] == 1
    marker = tmp_path / "pwned"
    if damage == "truncate":
        ckpt.path.write_bytes(ckpt.path.read_bytes()[:-10])
    else:
        plant(ckpt.path, marker, True)
    assert ckpt.load() is None
    assert not ckpt.path.exists() and not marker.exists()  # removed: the next save is clean


def test_resume_state_from_other_settings_is_ignored_not_removed(tmp_path):
    save_state({"key": "a", "done": 3}, tmp_path / "c.ckpt")
    assert load_resume(tmp_path / "c.ckpt", "b") is None and (tmp_path / "c.ckpt").exists()
    assert load_resume(tmp_path / "c.ckpt", "a") == {"key": "a", "done": 3}
    assert load_resume(tmp_path / "absent.ckpt", "a") is None and load_resume(None, "a") is None


def test_damaged_generator_checkpoint_starts_afresh(tmp_path, caplog):
    from histodistill.generate.train import TrainState, fit

    def state() -> TrainState:
        torch.manual_seed(0)
        net = torch.nn.Linear(2, 2)
        return TrainState({"net": net}, {"net": torch.optim.SGD(net.parameters(), 0.1)},
                          torch.Generator().manual_seed(0), "k", None)

    def resumed(steps: int) -> TrainState:
        out = state()
        fit(out, lambda step: {}, steps, tmp_path / "g.ckpt", 1, "g", progress=False)
        return out

    first = state()
    first.step = 5
    Checkpoint(tmp_path / "g.ckpt", "k").save(first.state_dict())
    assert resumed(5).step == 5  # resumed at the end: nothing left to do
    plant(tmp_path / "g.ckpt", tmp_path / "pwned", True)
    assert resumed(0).step == 0
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "g.ckpt").exists()

    def trained(ckpt: Path | None, stop_after: int | None = None) -> TrainState:
        out = state()
        x = torch.randn(8, 2, generator=torch.Generator().manual_seed(1))

        def step(i: int) -> dict[str, float]:
            loss = out.modules["net"](x).pow(2).mean()
            out.optimizers["net"].zero_grad()
            loss.backward()
            out.optimizers["net"].step()
            return {"loss": float(loss)}

        fit(out, step, 6, ckpt, 1, "g", stop_after=stop_after, progress=False)
        return out

    clean = trained(None)
    trained(tmp_path / "t.ckpt", stop_after=3)  # a checkpoint at step 3, then cut off mid-write
    (tmp_path / "t.ckpt").write_bytes((tmp_path / "t.ckpt").read_bytes()[:-40])
    with caplog.at_level("WARNING"):
        redone = trained(tmp_path / "t.ckpt")
    assert redone.step == 6 and re.search(r"t.ckpt is damaged .*redoing", caplog.text)
    for a, b in zip(redone.modules["net"].parameters(), clean.modules["net"].parameters()):
        assert torch.equal(a, b)  # redone from step 0 to what an unbroken run ends with


def test_an_atomic_write_removes_the_temporaries_a_killed_write_left(tmp_path):
    from histodistill.io import atomic_path

    left = [tmp_path / ".p.zarr.ab12cd_9.tmp", tmp_path / ".p.zarr.zz99yy00.tmp"]
    left[0].mkdir()
    (left[0] / "chunk").write_bytes(b"x" * 100)
    left[1].write_bytes(b"partial")
    other = tmp_path / ".p.zarr.png.ab12cd34.tmp"  # another output's temporary: not ours
    other.write_bytes(b"busy")
    with atomic_path(tmp_path / "p.zarr") as tmp:
        tmp.mkdir()
    assert sorted(p.name for p in tmp_path.iterdir()) == [other.name, "p.zarr"]


FULL_DISK = """
import resource, sys
import numpy as np, torch
resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000))  # every file stops at 20 kB
from histodistill.io import write_json
from histodistill.state import save_state
from histodistill.logs import rule_logging
out = sys.argv[1]
with rule_logging(out + "/rule.log"):
    if sys.argv[2] == "state":
        save_state({"w": torch.randn(100000)}, out + "/s.pt")
    else:
        write_json(out + "/r.json", {"x": list(range(20000))})
"""


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["state", "json"])
def test_a_full_disk_is_one_line_naming_the_file_and_leaves_nothing(tmp_path, kind):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", FULL_DISK, str(tmp_path), kind],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    name = "s.pt" if kind == "state" else "r.json"
    assert proc.stderr.strip().splitlines() == [
        f"histodistill error: [write] {tmp_path / name}: cannot be written: file too large (a "
        "file-size limit, or a full disk); nothing partial was left behind"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rule.log"]  # no temporary, no output


def test_a_read_only_folder_is_one_error_naming_the_output(tmp_path, monkeypatch):
    import errno

    from histodistill.io import OutputError, atomic_path

    import tempfile

    def refuse(*args, **kwargs):  # what a read-only folder does to the temporary's creation
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / ".out.pt.x.tmp"))

    for target in ((tempfile, "mkdtemp"), (os, "replace")):
        with monkeypatch.context() as patch:
            patch.setattr(*target, refuse)
            with pytest.raises(OutputError, match=r"\[write\] .*/out.pt: cannot be written: "
                                                  r"permission denied \(a read-only folder\?\)"):
                with atomic_path(tmp_path / "out.pt") as tmp:
                    tmp.write_bytes(b"x")
        assert list(tmp_path.iterdir()) == []


def test_a_log_folder_that_cannot_be_written_is_one_line(tmp_path, monkeypatch, capsys):
    import errno

    from histodistill.logs import rule_logging

    def refuse(*args, **kwargs):  # what a read-only logs/ folder does
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "logs"))

    monkeypatch.setattr(os, "makedirs", refuse)
    ran = []
    with pytest.raises(SystemExit) as exit_:
        with rule_logging(tmp_path / "logs" / "rule.log"):
            ran.append(True)
    assert exit_.value.code == 1 and not ran
    assert capsys.readouterr().err == (f"histodistill error: [io] log file {tmp_path}/logs/rule.log: "
                                       "Permission denied (permission denied (a read-only folder?))\n")


def test_a_damaged_json_input_is_one_error_and_damaged_json_resume_state_is_redone(tmp_path):
    from histodistill.stain import StainTemplate

    (tmp_path / "template.json").write_text('{"stains": [[0.6, 0.7')  # cut off mid-write
    with pytest.raises(InputError, match=r"^\[stain_template\] .*template.json: is not valid "
                                         r"JSON .*line 1.*delete it so that the rule"):
        StainTemplate.load(tmp_path / "template.json")
    (tmp_path / "runs.json").write_text('{"key": "k", "runs": [{"metrics"')
    assert load_resume(tmp_path / "runs.json", "k") is None
    assert not (tmp_path / "runs.json").exists()  # removed: the runs are redone


@pytest.mark.parametrize("left", [None, "piece", "slide.ckpt", "sealed"])
def test_a_failed_job_leaves_a_partial_folder_only_with_something_to_resume(tmp_path, left):
    """A job that fails keeps ``<out>.partial`` only when it holds a finished (sealed) piece or
    an unfinished piece's own resume state (``resumable``); an empty folder or an unsealed
    piece goes."""
    from histodistill.state import Pieces

    with pytest.raises(KeyboardInterrupt), Pieces(tmp_path / "out", resumable="*.ckpt") as pieces:
        if left is not None:
            (pieces.path("a" if left in ("piece", "sealed") else left)).write_text("x")
        if left == "sealed":
            pieces.seal("a", "key")
        raise KeyboardInterrupt
    assert (tmp_path / "out.partial").exists() == (left in ("slide.ckpt", "sealed"))
