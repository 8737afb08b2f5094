import json
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import gptn_cli as _cli
from conftest import kill_after_checkpoint, together
from gptn.checkpoint import checkpoint_dir, load_model
from gptn.cli import main
from gptn.config import GPTConfig
from gptn.data import prepare
from gptn.pretrain import PretrainConfig, pretrain
from gptn.train import Schedule, lr_at
from gptn.model import GPT

TEXT = "".join(f"Line {i}: the quick brown fox jumps over the lazy dog, {i % 7} times.\n" for i in range(3000))
TINY = ["--set", "n_layer=2", "--set", "n_head=2", "--set", "d_model=32", "--set", "n_ctx=32", "--set", "dropout=0.0"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    (root / "text.txt").write_text(TEXT)
    prepare([str(root / "text.txt")], "char", root / "c", val_fraction=0.1, progress=False)
    return root / "c"


def _weights(run):
    return load_file(str(checkpoint_dir(run) / "model.safetensors"))


def test_schedule_warmup_then_cosine():
    lrs = [lr_at(s, 100, 1e-3, 1e-4, 10) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert lrs[-1] == pytest.approx(1e-4, rel=0.01)


def test_a_time_budget_anneals_the_schedule_within_it(corpus, tmp_path):
    schedule = Schedule(1e-3, 10, 10_000, 1e-4, "cosine", max_seconds=60)
    assert schedule.at(5, 0.0) == pytest.approx(6e-4)  # warm-up counts steps
    capped = Schedule(1e-3, 2_000, 100_000, 1e-4, "cosine", max_seconds=60)  # the steps only a cap
    assert capped.at(50, 0.6) == pytest.approx(5e-4)  # half of 2% of the time: half-way up
    assert capped.at(60, 1.2) == pytest.approx(1e-3, rel=2e-3)  # 2% of the time: warmed up
    assert schedule.at(100, 30.0) == pytest.approx(5.5e-4)  # half the time spent: half-way down the cosine
    assert schedule.at(100, 60.0) == pytest.approx(1e-4)
    summary = pretrain(PretrainConfig(corpus=str(corpus), out=str(tmp_path / "run"), preset="tiny",
                                      overrides={"dropout": 0.0, "n_ctx": 32}, steps=100_000, batch_tokens=32 * 8,
                                      lr=3e-3, warmup_steps=5, eval_interval=0, log_interval=1, max_seconds=3,
                                      progress=False))
    assert 10 < summary["steps"] < 100_000
    lrs = [json.loads(x)["lr"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert lrs[-1] < 3e-4 * 1.1  # the step budget is far away, but the rate has come down to min_lr


def test_the_resolved_options_travel_inside_the_checkpoint_and_the_callers_config_is_untouched(corpus, tmp_path):
    import dataclasses
    cfg = PretrainConfig(corpus=str(corpus), out=str(tmp_path / "run"), preset="tiny", overrides={"n_ctx": 32},
                         steps=4, checkpoint_interval=2, eval_interval=0, progress=False)
    given = dataclasses.replace(cfg)
    pretrain(cfg)
    assert cfg == given  # lr, batch, warm-up... were resolved into the run's own copy
    saved = json.loads((tmp_path / "run" / "checkpoint" / "train_config.json").read_text())
    assert saved["batch_tokens"] % 32 == 0 and saved["lr"] is not None and saved["warmup_steps"] == 1  # resolved
    assert not (tmp_path / "run" / "train_config.json").exists()  # nothing outside the atomic checkpoint
    meta = json.loads((tmp_path / "run" / "checkpoint" / "meta.json").read_text())
    assert "train_config.json" in meta["files_sha256"]  # checked like every file of the checkpoint
    summary = pretrain(dataclasses.replace(cfg, steps=6))  # a resume reads it back: same schedule, more steps
    assert summary["start_step"] == 4 and summary["steps"] == 6


def test_pretrain_learns_and_writes_a_run(corpus, tmp_path):
    summary = pretrain(PretrainConfig(corpus=str(corpus), out=str(tmp_path / "run"), preset="tiny",
                                      overrides={"dropout": 0.0, "n_ctx": 32}, steps=60, batch_tokens=32 * 8,
                                      lr=3e-3, eval_interval=30, checkpoint_interval=30, progress=False))
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    val = [r for r in records if "val_loss" in r]
    assert train[-1]["loss"] < train[0]["loss"] - 1.0  # it learns
    assert [r["step"] for r in val] == [0, 30, 60]  # step 0: the untrained model
    assert val[-1]["val_ppl"] == pytest.approx(2.718281828 ** val[-1]["val_loss"], rel=1e-6)
    assert all(0 < r["mfu"] < 1 and r["tokens_per_s"] > 0 for r in train)
    assert summary["steps"] == 60
    model, tok = load_model(tmp_path / "run")
    assert tok.vocab_size == model.config.vocab_size
    if summary["loss_curve"]:
        assert (tmp_path / "run" / "loss.png").stat().st_size > 1000


def test_step_zero_shows_the_random_start_near_ln_v(tmp_path, capsys):
    import math
    (tmp_path / "t.txt").write_text(TEXT)
    prepare([str(tmp_path / "t.txt")], "bpe:300", tmp_path / "c", val_fraction=0.1, progress=False)
    assert main(["pretrain", str(tmp_path / "c"), "--out", str(tmp_path / "r"), "--preset", "tiny", *TINY,
                 "--steps", "0", "--no-progress"]) == 0
    out = capsys.readouterr().out
    records = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    vocab = json.loads((checkpoint_dir(tmp_path / "r") / "config.json").read_text())["vocab_size"]
    assert records[0]["step"] == 0 and abs(records[0]["val_loss"] / math.log(vocab) - 1) < 0.05
    assert "untrained model" in out and f"ln {vocab:,} = {math.log(vocab):.4f}" in out
    # a run continued from step 0 logs step 0 first, then learns
    assert main(["pretrain", str(tmp_path / "c"), "--out", str(tmp_path / "r2"), "--preset", "tiny", *TINY,
                 "--steps", "20", "--eval-interval", "10", "--batch-tokens", "256", "--lr", "3e-3"]) == 0
    records = [json.loads(x) for x in (tmp_path / "r2" / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in records if "val_loss" in r]
    assert val[0]["step"] == 0 and [r["step"] for r in records if "loss" in r][0] > 0
    assert val[-1]["val_loss"] < val[0]["val_loss"] - 0.5
    assert "step 0: val_loss" in capsys.readouterr().err  # the progress line


def test_activation_checkpointing_trains_the_same_weights(corpus, tmp_path):
    """Recomputing each block in backward (dropout included: its random state is replayed) changes
    memory, not the result; the command-line flag reaches the model."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=40, n_ctx=16, n_layer=2, n_head=2, d_model=32, dropout=0.1)).train()
    x = torch.randint(0, 40, (4, 16))
    grads = []
    for recompute in (False, True):
        model.zero_grad()
        model.activation_checkpointing = recompute
        torch.manual_seed(1)
        model(x, x)[1].backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)
    runs = []
    for flag in ([], ["--activation-checkpointing"]):
        runs.append(tmp_path / f"run{len(runs)}")
        assert main(["pretrain", str(corpus), "--out", str(runs[-1]), *TINY, "--steps", "3", "--batch-tokens", "128",
                     "--no-progress", *flag]) == 0
    plain, recomputed = _weights(runs[0]), _weights(runs[1])
    for name in plain:
        torch.testing.assert_close(plain[name], recomputed[name], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_resume_after_sigkill_is_exact(corpus, tmp_path, optimizer):
    common = ["pretrain", str(corpus), "--preset", "tiny", *TINY, "--steps", "40", "--batch-tokens", "256",
              "--lr", "3e-3", "--optimizer", optimizer, "--eval-interval", "20", "--checkpoint-interval", "5",
              "--no-progress"]
    # The run uninterrupted, and the same run SIGKILLed once it has checkpointed past step 10, then resumed.
    full, killed_at = together(lambda: _cli(*common, "--out", str(tmp_path / "full")),
                               lambda: kill_after_checkpoint([*common, "--out", str(tmp_path / "killed")],
                                                             tmp_path / "killed" / "checkpoint" / "meta.json", 10))
    assert full.returncode == 0, full.stderr
    assert 10 <= killed_at < 40, "the run finished before it could be killed; make it longer"
    resumed = _cli(*common, "--out", str(tmp_path / "killed"))
    assert resumed.returncode == 0, resumed.stderr
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "killed")
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(x)["step"] for x in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(x)]
    assert steps == sorted(set(steps))  # the records of the killed run after its checkpoint were dropped


_SAVER = """
import sys, torch
from gptn.checkpoint import save_checkpoint
from gptn.config import GPTConfig
cfg = GPTConfig(vocab_size=50, n_ctx=16, n_layer=1, n_head=2, d_model=16)
i = 0
while True:
    i += 1
    state = {"w": torch.full((4_000_000,), float(i))}
    save_checkpoint(sys.argv[1], cfg, state, meta={"step": i})
    print(i, flush=True)
"""


def test_checkpoint_survives_kill_during_save(tmp_path):
    run = tmp_path / "run"
    for delay in (0.3, 0.55, 0.8, 1.1):
        proc = subprocess.Popen([sys.executable, "-c", _SAVER, str(run)], stdout=subprocess.PIPE, text=True)
        proc.stdout.readline()  # at least one complete checkpoint exists
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        ckpt = checkpoint_dir(run)
        meta = json.loads((ckpt / "meta.json").read_text())
        w = load_file(str(ckpt / "model.safetensors"))["w"]
        assert torch.all(w == meta["step"])  # weights and metadata of one and the same save
        assert GPTConfig.load(ckpt / "config.json").d_model == 16


@pytest.mark.parametrize("strategy,optimizer", [("ddp", "adamw"), ("fsdp", "adamw"), ("ddp", "muon")])
def test_two_ranks_equal_one_rank_with_accumulation(corpus, tmp_path, strategy, optimizer):
    common = ["pretrain", str(corpus), "--preset", "tiny", *TINY, "--steps", "3", "--batch-tokens", str(32 * 8),
              "--micro-batch", "2", "--lr", "1e-2", "--optimizer", optimizer, "--eval-interval", "0", "--no-progress"]
    # 8 sequences a step: one rank with 4 micro-batches of 2, and 2 ranks with 2 micro-batches of 2 each
    one, two = together(lambda: _cli(*common, "--out", str(tmp_path / "one")),
                        lambda: _cli(*common, "--strategy", strategy, "--out", str(tmp_path / "two"), ranks=2))
    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=2e-5, rtol=1e-4)
    start = _weights(tmp_path / "one")
    assert any(not torch.equal(start[k], GPT(GPTConfig.load(checkpoint_dir(tmp_path / "one") / "config.json"))
                               .state_dict()[k]) for k in start)


def test_nan_loss_stops_naming_the_step(corpus, tmp_path, capsys):
    code = main(["pretrain", str(corpus), "--out", str(tmp_path / "run"), "--preset", "tiny", *TINY, "--steps", "50",
                 "--batch-tokens", "256", "--lr", "1e35", "--grad-clip", "0", "--checkpoint-interval", "1000",
                 "--eval-interval", "0", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "at step" in err and ("nan" in err or "inf" in err)
    assert len(err.strip().splitlines()) == 1


def test_bad_inputs_before_training(corpus, tmp_path, capsys):
    run = str(tmp_path / "run")
    assert main(["pretrain", str(corpus), "--out", run, "--preset", "tiny", "--set", "n_ctx=4096"]) == 2
    assert "longer than" in capsys.readouterr().err
    assert main(["pretrain", str(corpus), "--out", run, "--preset", "tiny", "--batch-tokens", "100"]) == 2
    assert "whole number" in capsys.readouterr().err
    assert main(["pretrain", str(corpus), "--out", run, "--preset", "tiny", *TINY, "--batch-tokens", "96",
                 "--micro-batch", "2"]) == 2
    assert "not divisible" in capsys.readouterr().err
    assert main(["pretrain", str(corpus), "--out", run, "--preset", "nope"]) == 2
    assert "unknown preset" in capsys.readouterr().err
    assert main(["pretrain", str(corpus), "--out", run, "--set", "colour=blue"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err
    # A run directory holding a different model, and a corpus with another tokenizer.
    assert main(["pretrain", str(corpus), "--out", run, "--preset", "tiny", *TINY, "--steps", "2",
                 "--batch-tokens", "64", "--eval-interval", "0", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["pretrain", str(corpus), "--out", run, "--preset", "tiny", "--set", "n_layer=3"]) == 2
    assert "holds a different model" in capsys.readouterr().err
    assert main(["pretrain", str(corpus), "--out", run, "--optimizer", "muon", "--steps", "4"]) == 2
    assert "trained with --optimizer adamw" in capsys.readouterr().err
    assert main(["pretrain", str(corpus), "--out", str(tmp_path / "new"), "--preset", "tiny", "--optimizer", "muon",
                 "--strategy", "fsdp"]) == 2
    assert "use --strategy ddp" in capsys.readouterr().err
    other = tmp_path / "other.txt"
    other.write_text("completely different alphabet: XYZ!?" * 200)
    prepare([str(other)], "char", tmp_path / "c2", progress=False)
    assert main(["pretrain", str(tmp_path / "c2"), "--out", run, "--steps", "4"]) == 2
    assert "another tokenizer" in capsys.readouterr().err
    assert main(["pretrain", str(tmp_path / "nope"), "--out", run]) == 2
    assert "not a prepared corpus" in capsys.readouterr().err


def test_torchrun_batch_not_divisible_across_ranks(corpus, tmp_path):
    r = _cli("pretrain", str(corpus), "--preset", "tiny", *TINY, "--batch-tokens", str(32 * 3),
             "--out", str(tmp_path / "run"), "--no-progress", ranks=2)
    assert r.returncode != 0 and "not divisible across 2 ranks" in r.stderr


def test_quickstart_pipeline_on_a_tiny_budget(tmp_path):
    from gptn.quickstart import quickstart
    src = tmp_path / "src"
    src.mkdir()
    for i in range(25):
        (src / f"m{i}.py").write_text(f"def f{i}(x):\n    return x * {i}\n\n\nfor i in range({i}):\n    print(f{i}(i))\n" * 5)
    lines = []
    result = quickstart(tmp_path / "qs", sources=[str(src)], minutes=0.05, vocab=300, progress=False, say=lines.append)
    assert (tmp_path / "qs" / "run" / "checkpoint" / "model.safetensors").is_file()
    assert len(result["samples"]) == 1 and len(result["next"]) == 5  # another corpus: one sample, after the prompt
    assert abs(sum(r["prob"] for r in result["next"])) <= 1.0
    out = "\n".join(lines)
    assert "written:" in out and str(tmp_path / "qs" / "run") in out


def test_loggers_wandb_offline_and_csv_record_config_and_final_metrics(corpus, tmp_path, monkeypatch, capsys):
    pytest.importorskip("wandb", reason="wandb is in the dev extra")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "run"
    assert main(["pretrain", str(corpus), "--out", str(run), "--preset", "tiny", *TINY, "--steps", "20",
                 "--batch-tokens", "256", "--eval-interval", "10", "--logger", "wandb,csv",
                 "--no-progress"]) == 0
    (log,) = run.glob("wandb/offline-run-*/run-*.wandb")  # what `wandb sync` uploads
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    last_val = [r for r in records if "val_loss" in r][-1]["val_loss"]
    wandb_records = list(_wandb_records(log))
    (started,) = [r.run for r in wandb_records if r.WhichOneof("record_type") == "run"]
    config = {u.key: json.loads(u.value_json) for u in started.config.update}
    assert config["batch_tokens"] == 256 and config["steps"] == 20 and config["logger"] == "wandb,csv"
    summary = {u.key or "/".join(u.nested_key): json.loads(u.value_json) for r in wandb_records
               if r.WhichOneof("record_type") == "summary" for u in r.summary.update}
    assert summary["final/val_loss"] == pytest.approx(last_val)
    history = [{u.key or "/".join(u.nested_key): json.loads(u.value_json) for u in r.history.item}
               for r in wandb_records if r.WhichOneof("record_type") == "history"]
    assert {h["_step"] for h in history} == {r["step"] for r in records}  # 0 (the untrained model), 10, 20
    assert history[-1]["val_loss"] == pytest.approx(last_val)
    import csv
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert [int(r["step"]) for r in rows] == [r["step"] for r in records]
    assert float(rows[-1]["val_loss"]) == pytest.approx(last_val)
    assert main(["pretrain", str(corpus), "--out", str(tmp_path / "x"), "--logger", "mlflow"]) == 2
    assert "--logger" in capsys.readouterr().err


def _wandb_records(path):
    """The records of an offline W&B run file (LevelDB's log format: 32 KiB blocks of checksummed,
    length-prefixed fragments, after a 7-byte ":W&B" header), as wandb's protobuf Records."""
    import struct

    from wandb.proto import wandb_internal_pb2
    data, pos, pending = path.read_bytes(), 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pending, pos = pending + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # a whole record, or the last fragment of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def test_piped_output_is_one_plain_line_per_log_interval(corpus, tmp_path):
    common = ["pretrain", str(corpus), "--preset", "tiny", *TINY, "--steps", "60", "--batch-tokens", "64",
              "--eval-interval", "20", "--eval-batches", "1"]
    # stderr is a pipe, as in a log file or CI; and the same run with --no-progress
    p, quiet = together(lambda: _cli(*common, "--out", str(tmp_path / "a")),
                        lambda: _cli(*common, "--out", str(tmp_path / "b"), "--no-progress"))
    assert p.returncode == 0, p.stderr
    assert "\r" not in p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("pretrain step")]
    assert [ln.split(":")[0] for ln in lines if "/60" in ln] == [f"pretrain step {s}/60" for s in range(10, 61, 10)]
    evals = [ln for ln in lines if "val_loss" in ln]
    assert [ln.split(":")[0] for ln in evals] == [f"pretrain step {s}" for s in (0, 20, 40, 60)]
    # --no-progress still says how evaluation goes
    assert [ln.split(":")[0] for ln in quiet.stderr.splitlines() if "val_loss" in ln] == \
        [f"pretrain step {s}" for s in (0, 20, 40, 60)]
    assert not any("/60" in ln for ln in quiet.stderr.splitlines())
