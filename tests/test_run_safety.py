"""No command destroys a run: writing onto the source, onto another run, or onto a run of another kind
is refused in one line (exit 2) before anything is written, and the run is byte-identical afterwards."""

import hashlib

import pytest

from conftest import build_runs

from gptn.cli import main

TEXT = "the quick brown fox jumps over the lazy dog. " * 300


def _snapshot(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lock"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return build_runs(tmp_path_factory.mktemp("runs"))


@pytest.mark.parametrize("command", [
    lambda r: ["finetune", str(r / "pre"), "--train", str(r / "t.tsv"), "--out", str(r / "pre")],  # onto its source
    lambda r: ["finetune", str(r / "pre"), "--train", str(r / "t.tsv"), "--out", str(r / "ft")],  # a finished run
    lambda r: ["import-hf", str(r / "hf"), str(r / "pre")],  # an import onto a pretraining run
    lambda r: ["import-hf", str(r / "hf"), str(r / "ft")],
    lambda r: ["pretrain", str(r / "c"), "--out", str(r / "ft")],  # pretraining onto a fine-tuned run
    lambda r: ["pretrain", str(r / "c"), "--out", str(r / "pre"), "--init-from", str(r / "pre")],
])
def test_a_command_that_would_destroy_a_run_is_refused_and_the_run_is_unchanged(runs, command, capsys):
    before = {name: _snapshot(runs / name) for name in ("pre", "ft")}
    assert main(command(runs)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and ("already holds" in err or "source run itself" in err), err
    assert {name: _snapshot(runs / name) for name in ("pre", "ft")} == before


def test_import_hf_takes_the_run_lock(runs, capsys):
    from gptn.checkpoint import run_lock
    with run_lock(runs / "new"):
        assert main(["import-hf", str(runs / "hf"), str(runs / "new")]) == 2
    assert "being written by another gptn process" in capsys.readouterr().err
    assert main(["import-hf", str(runs / "hf"), str(runs / "new")]) == 0  # and then works


@pytest.fixture
def small_disk(tmp_path):
    """A 96 KiB filesystem (tmpfs): what a full disk looks like to every writer."""
    import os
    import subprocess
    folder = tmp_path / "small"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        if os.environ.get("CI"):
            raise RuntimeError(f"CI runs as root and must mount a tmpfs: {mounted.stderr.decode()}")
        pytest.skip("mounting a small tmpfs needs root")
    yield folder
    subprocess.run(["umount", str(folder)], check=True)


def test_a_full_disk_is_one_line_naming_the_space_for_every_writer(runs, small_disk, capsys):
    commands = [
        ["pretrain", str(runs / "c"), "--out", str(small_disk / "p"), "--preset", "tiny", "--set", "n_ctx=32",
         "--steps", "2", "--batch-tokens", "128", "--eval-interval", "0"],
        ["finetune", str(runs / "pre"), "--train", str(runs / "t.tsv"), "--out", str(small_disk / "f"), "--epochs", "1"],
        ["export-hf", str(runs / "pre"), str(small_disk / "e")],
        ["import-hf", str(runs / "hf"), str(small_disk / "i")],
    ]
    for command in commands:
        capsys.readouterr()
        assert main([*command, "--no-progress"] if command[0] in ("pretrain", "finetune") else command) == 2, command
        err = [ln for ln in capsys.readouterr().err.splitlines() if ": error: " in ln]
        assert len(err) == 1 and "MiB are free" in err[0] and str(small_disk) in err[0], (command, err)


def test_resuming_with_another_rate_is_refused_saying_what_changed(runs, capsys):
    before = _snapshot(runs / "pre")
    assert main(["pretrain", str(runs / "c"), "--out", str(runs / "pre"), "--lr", "0.5", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "lr 0.001 -> 0.5" in err
    assert _snapshot(runs / "pre") == before
