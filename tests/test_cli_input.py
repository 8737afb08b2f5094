"""Careless input on the command line: one line and exit 2, never a traceback; and the shell habits
users bring (escaped stop strings, named continuations)."""

import json
import os
import subprocess
import sys

import pytest

from gptn.checkpoint import save_checkpoint
from gptn.cli import main
from gptn.data import prepare

TEXT = "".join(f"line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(400))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("c")
    (root / "t.txt").write_text(TEXT)
    prepare([str(root / "t.txt")], "char", root / "c", val_fraction=0.1, progress=False)
    return root / "c"


@pytest.fixture(scope="module")
def run(tmp_path_factory, tok, model):
    path = tmp_path_factory.mktemp("run") / "r"
    save_checkpoint(path, model.config, model.state_dict(), tokenizer=tok)
    return path


def _one_line_error(capsys, code):
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.count("\n") == 0 and "Traceback" not in err and "error:" in err
    return err


@pytest.mark.parametrize("flags", [
    ["--lr", "nan"], ["--lr", "-1"], ["--checkpoint-interval", "0"], ["--checkpoint-interval", "-1"],
    ["--micro-batch", "-2"], ["--micro-batch", "0"], ["--batch-tokens", "0"], ["--seed", "-1"],
    ["--set", "dropout=nan"], ["--set", "bias=maybe"], ["--warmup-steps", "-1"], ["--grad-clip", "nan"],
    ["--max-seconds", "nan"], ["--eval-batches", "0"], ["--steps", "-1"],  # --steps 0: the random start
])
def test_bad_pretrain_flags_are_one_line(corpus, tmp_path, capsys, flags):
    code = main(["pretrain", str(corpus), "--out", str(tmp_path / "r"), "--preset", "tiny", "--no-progress", *flags])
    _one_line_error(capsys, code)
    assert not (tmp_path / "r" / "checkpoint").exists()


@pytest.mark.parametrize("flags", [["--temperature", "nan"], ["--top-p", "nan"], ["--repetition-penalty", "inf"]])
def test_bad_sampling_flags_are_one_line(run, capsys, flags):
    _one_line_error(capsys, main(["generate", str(run), "--prompt", "a", *flags]))


def test_finetune_on_a_binary_file_is_one_line(run, tmp_path, capsys):
    (tmp_path / "x.tsv").write_bytes(b"\xff\xfe\x00garbage\x80")
    err = _one_line_error(capsys, main(["finetune", str(run), "--train", str(tmp_path / "x.tsv"),
                                        "--out", str(tmp_path / "ft")]))
    assert "not UTF-8" in err


def test_stop_takes_the_escapes_a_shell_user_types(run, capsys):
    from gptn.sampling import unescape
    assert unescape("\\n") == "\n" and unescape("a\\tb") == "a\tb" and unescape("\\\\n") == "\\n"
    assert main(["generate", str(run), "--prompt", "the", "--greedy", "--max-new-tokens", "60", "--no-stream"]) == 0
    full = capsys.readouterr().out.split("\n", 1)[1][:-1]
    assert main(["generate", str(run), "--prompt", "the", "--greedy", "--max-new-tokens", "60", "--no-stream",
                 "--stop", "\\n"]) == 0
    cut = capsys.readouterr().out.split("\n", 1)[1][:-1]
    assert cut == full.split("\n")[0]  # cut at the first new line, as `--stop $'\n'` would


def test_next_scores_named_words(run, capsys):
    assert main(["next", str(run), "the quick", "--top", "3", "--words", "brown,fox", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [w["word"] for w in out["words"]] == ["brown", "fox"]
    assert out["words"][0]["tokens"] == len(" brown")  # characters: one token each
    assert all(0 < w["prob"] < 1 for w in out["words"])
    # the product of the tokens' probabilities, each given what comes before
    from gptn.checkpoint import load_model
    from gptn.generate import next_token_probs
    model, tok = load_model(run)
    p, prompt = 1.0, "the quick"
    for ch in " fox":
        p *= next(r["prob"] for r in next_token_probs(model, tok, prompt, tok.vocab_size) if r["token"] == ch)
        prompt += ch
    assert out["words"][1]["prob"] == pytest.approx(p, rel=1e-4)
    # the lecture's view: each word's share of the named words, summing to 100%
    assert sum(w["share"] for w in out["words"]) == pytest.approx(1.0)
    assert out["words"][0]["share"] / out["words"][1]["share"] == pytest.approx(
        out["words"][0]["prob"] / out["words"][1]["prob"], rel=1e-6)
    # rank: the first token's place among all next tokens
    full = next_token_probs(model, tok, "the quick", tok.vocab_size)
    assert out["words"][0]["rank"] == 1 + [r["token"] for r in full].index(" ")
    assert main(["next", str(run), "the quick", "--words", "brown"]) == 0
    assert "share 100.0%" in capsys.readouterr().out


def test_next_prints_small_probabilities_with_their_digits_and_no_empty_bars(run, capsys):
    assert main(["next", str(run), "the quick", "--top", "200", "--words", "xqzj,brown,zzzz"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [ln for ln in lines if ln.startswith("  ")]
    assert not any(" 0.00%" in ln for ln in rows)  # what rounds to 0.00% is shown as 1.23e-05
    assert any("e-" in ln for ln in rows)
    for ln in rows:
        if "share" in ln:
            share = float(ln.split("share")[1].split("%")[0])
            assert ("█" in ln) == (round(share / 100 * 40) > 0)
        else:
            prob = float(ln.split()[-2].rstrip("%")) / 100 if "█" in ln else None
            assert prob is None or round(prob * 40) > 0


def test_a_second_writer_on_one_run_is_refused(corpus, tmp_path, capsys):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = ["pretrain", str(corpus), "--out", str(tmp_path / "r"), "--preset", "tiny", "--set", "n_ctx=32",
            "--steps", "3000", "--batch-tokens", "64", "--no-progress"]
    first = subprocess.Popen([sys.executable, "-m", "gptn", *args], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
    try:
        import time
        for _ in range(300):
            if (tmp_path / "r" / "metrics.jsonl").exists():  # the first evaluation: it holds the run
                break
            time.sleep(0.1)
        assert main(args) == 2  # the second writer: this process
        err = capsys.readouterr().err
        assert "being written by another gptn process" in err and err.count("\n") == 1
    finally:
        first.kill()
        first.wait()
    # a killed writer leaves no lock behind: the run resumes
    assert main([a if a != "3000" else "1" for a in args]) == 0, capsys.readouterr().err


def test_sigint_saves_the_steps_so_far(corpus, tmp_path):
    import signal
    import time
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [sys.executable, "-m", "gptn", "pretrain", str(corpus), "--out", str(tmp_path / "r"), "--preset", "tiny",
            "--set", "n_ctx=32", "--steps", "100000", "--batch-tokens", "64", "--checkpoint-interval", "100000",
            "--eval-interval", "0", "--no-progress"]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "r" / "metrics.jsonl"
    for _ in range(600):
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    state = json.loads((tmp_path / "r" / "checkpoint" / "meta.json").read_text())
    assert state["step"] >= 30  # saved at the interrupt, not lost since step 0


def _trained(corpus, out):
    from gptn.pretrain import PretrainConfig, pretrain
    pretrain(PretrainConfig(corpus=str(corpus), out=str(out), preset="tiny", overrides={"n_ctx": 32}, steps=2,
                            batch_tokens=64, eval_interval=0, progress=False))
    return out


@pytest.mark.parametrize("damage", ["truncate", "empty", "flip_header", "flip_byte"])
def test_damaged_weights_are_one_line(corpus, tmp_path, capsys, damage):
    run = _trained(corpus, tmp_path / "r")
    f = run / "checkpoint" / "model.safetensors"
    data = bytearray(f.read_bytes())
    if damage == "truncate":
        data = data[:len(data) // 2]
    elif damage == "empty":
        data = bytearray()
    elif damage == "flip_header":
        data[:8] = b"\xff" * 8
    else:  # one flipped bit deep in a tensor: only the checksum sees it
        data[-100] ^= 1
    f.write_bytes(bytes(data))
    err = _one_line_error(capsys, main(["next", str(run), "the"]))
    assert "model.safetensors" in err
    _one_line_error(capsys, main(["pretrain", str(corpus), "--out", str(run), "--steps", "4", "--no-progress"]))


def test_damaged_run_and_corpus_files_are_one_line(corpus, tmp_path, capsys):
    import shutil
    run = _trained(corpus, tmp_path / "r")
    state = run / "checkpoint" / "train_state.pt"
    state.write_bytes(state.read_bytes()[:200])
    err = _one_line_error(capsys, main(["pretrain", str(corpus), "--out", str(run), "--steps", "4", "--no-progress"]))
    assert "train_state.pt" in err
    (run / "checkpoint" / "config.json").write_bytes(b"\xff\xfe{")
    assert "config.json" in _one_line_error(capsys, main(["next", str(run), "the"]))
    bad = tmp_path / "corpus"
    shutil.copytree(corpus, bad)
    (bad / "manifest.json").write_bytes(b"\xff\xfe")
    _one_line_error(capsys, main(["pretrain", str(bad), "--out", str(tmp_path / "x"), "--no-progress"]))
    shutil.rmtree(bad)
    shutil.copytree(corpus, bad)
    shard = bad / "train-00000.tok"
    raw = bytearray(shard.read_bytes())
    raw[40:42] = b"\xff\xff"  # token id 65535 in a character corpus
    shard.write_bytes(bytes(raw))
    err = _one_line_error(capsys, main(["pretrain", str(bad), "--out", str(tmp_path / "y"), "--preset", "tiny",
                                        "--no-progress"]))
    assert "train-00000.tok holds token id 65535" in err


def test_a_small_model_with_gpt2s_vocabulary_is_told_where_its_time_goes(shared_data, tmp_path, capsys):
    (tmp_path / "t.txt").write_text(TEXT)
    prepare([str(tmp_path / "t.txt")], str(shared_data / "gpt2-bpe"), tmp_path / "c", val_fraction=0.1,
            progress=False)
    assert main(["pretrain", str(tmp_path / "c"), "--out", str(tmp_path / "r"), "--preset", "tiny", "--steps", "1",
                 "--set", "n_ctx=16", "--batch-tokens", "32", "--no-progress"]) == 0
    err = capsys.readouterr().err
    import re
    share = re.search(r"costs (\d+)% of the training FLOPs", err)
    assert "vocabulary 50,257 x d_model 64" in err and share and int(share.group(1)) >= 90


def test_a_notice_during_streaming_starts_on_a_fresh_line(run):
    out = subprocess.run([sys.executable, "-m", "gptn", "generate", str(run), "--prompt", "the", "--greedy",
                          "--max-new-tokens", "80"], env={**os.environ, "OMP_NUM_THREADS": "1"},
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120)
    assert out.returncode == 0
    notice = out.stdout.index("gptn: ")  # the window slid: 80 new tokens outgrow the 48-token context
    assert out.stdout[notice - 1] == "\n" and out.stdout.startswith("the")


def test_generate_refuses_an_encoder_before_any_output(tmp_path, tok):
    from gptn.config import GPTConfig
    from gptn.model import GPT
    bert = GPT(GPTConfig(vocab_size=tok.vocab_size, n_ctx=16, n_layer=1, n_head=2, d_model=16, arch="bert"))
    save_checkpoint(tmp_path / "bert", bert.config, bert.state_dict(), tokenizer=tok)
    out = subprocess.run([sys.executable, "-m", "gptn", "generate", str(tmp_path / "bert"), "--prompt", "hello"],
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stdout == "" and "BERT-style encoder" in out.stderr


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc, where nothing can be created")
def test_an_output_the_filesystem_refuses_is_one_line(corpus, run, tmp_path, capsys):
    # Root ignores file modes, so "cannot create here" is /proc (on Linux), and a file where a folder goes.
    (tmp_path / "a-file").write_text("x")
    for argv in (["pretrain", str(corpus), "--out", "/proc/gptn-run", "--preset", "tiny", "--no-progress"],
                 ["pretrain", str(corpus), "--out", str(tmp_path / "a-file"), "--preset", "tiny", "--no-progress"],
                 ["prepare", str(tmp_path / "a-file"), "--tokenizer", "char", "--out", "/proc/gptn-corpus"],
                 ["export-hf", str(run), str(tmp_path / "a-file")],
                 ["export-hf", str(run), "/proc/gptn-hf"]):
        err = _one_line_error(capsys, main(argv))
        assert "/proc" in err or "a-file" in err, err  # the message names the path


@pytest.mark.parametrize("argv, config, least", [
    (["pretrain", "C", "--out", "R"], "gptn.pretrain:PretrainConfig", 20),
    (["finetune", "R", "--train", "T", "--out", "O"], "gptn.finetune:FinetuneConfig", 20),
    (["generate", "R", "--prompt", "p"], "gptn.sampling:SamplingConfig", 9),
    (["serve", "R"], "gptn.protocol:ServeConfig", 12),
])
def test_cli_defaults_are_the_config_dataclasses(argv, config, least):
    """Flags generated from the dataclass (gptn.options): a flag not given is the field's own default."""
    import dataclasses
    import importlib

    from gptn.cli import build_parser
    from gptn.options import from_options
    module, name = config.split(":")
    cls = getattr(importlib.import_module(module), name)
    parsed = build_parser().parse_args(argv)
    args = vars(parsed)
    given = {f.name: args.get(f.name) for f in dataclasses.fields(cls)
             if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    built = from_options(cls, parsed, **given)
    flags = [f for f in dataclasses.fields(cls) if f.metadata.get("help") and f.metadata.get("cli") is None
             and f.name not in given]
    assert len(flags) >= least and not any(f.name in args for f in flags)  # none given on this line
    for f in flags:
        assert getattr(built, f.name) == getattr(cls(**given), f.name), f.name


def test_generate_reads_a_prompt_from_a_file_or_standard_input(run, tmp_path, capsys, monkeypatch):
    import io
    args = ["generate", str(run), "--greedy", "--max-new-tokens", "20", "--no-stream"]
    assert main([*args, "--prompt", "the quick"]) == 0
    expected = capsys.readouterr().out
    (tmp_path / "p.txt").write_text("the quick")
    assert main([*args, "--prompt-file", str(tmp_path / "p.txt")]) == 0
    assert capsys.readouterr().out == expected
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"the quick")))
    assert main([*args, "--prompt-file", "-"]) == 0
    assert capsys.readouterr().out == expected
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe the")
    assert main([*args, "--prompt-file", str(tmp_path / "bad.txt")]) == 2
    err = capsys.readouterr().err
    assert "bad.txt" in err and "UTF-8" in err and len(err.strip().splitlines()) == 1


def test_every_flag_of_every_command_says_what_it_does():
    import argparse
    from gptn.cli import build_parser
    parser = build_parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    silent = [f"{name} {action.option_strings or action.dest}" for name, sub in commands.choices.items()
              for action in sub._actions if not isinstance(action, argparse._HelpAction) and not action.help]
    assert silent == []


def test_options_come_from_a_config_file_and_the_command_line_wins(corpus, tmp_path, capsys):
    """--config FILE.yaml holds options under their flags' names (litgpt's way); a flag on the line
    overrides the file; a bad file is one line naming it."""
    (tmp_path / "run.yaml").write_text("steps: 3\nlr: 0.002\nbatch_tokens: 128\neval_interval: 0\nseed: 7\n"
                                       "progress: false\n")
    out = tmp_path / "r"
    assert main(["pretrain", str(corpus), "--out", str(out), "--preset", "tiny", "--set", "n_ctx=32",
                 "--config", str(tmp_path / "run.yaml"), "--seed", "9"]) == 0
    saved = json.loads((out / "checkpoint" / "train_config.json").read_text())
    assert (saved["steps"], saved["lr"], saved["batch_tokens"], saved["seed"], saved["progress"]) == (3, 0.002, 128, 9, False)
    for name, text, words in (("bad.yaml", "steps: [1\n", "bad.yaml"), ("unknown.yaml", "stepz: 3\n", "stepz"),
                              ("list.yaml", "- 1\n", "list.yaml"), ("type.json", '{"steps": "many"}', "steps"),
                              ("model.json", '{"n_layer": 2, "d_model": 64}', "--model-config")):
        (tmp_path / name).write_text(text)
        err = _one_line_error(capsys, main(["pretrain", str(corpus), "--out", str(tmp_path / "x"),
                                            "--config", str(tmp_path / name)]))
        assert words in err, err
    assert not (tmp_path / "x").exists()


def test_a_serve_config_file_and_the_same_flags_give_the_same_options(tmp_path, capsys):
    """`gptn serve --config SERVE.yaml` (litgpt's habit for every training and serving command): the file
    and the equivalent flags resolve to the same ServeConfig; a bad value in the file is one line."""
    from gptn.cli import build_parser
    from gptn.options import from_options
    from gptn.protocol import ServeConfig
    (tmp_path / "serve.yaml").write_text("port: 8123\nmax_batch: 8\ndtype: int8\nrequest_timeout: 2.5\n")
    parse = build_parser().parse_args
    from_file = from_options(ServeConfig, parse(["serve", "R", "--config", str(tmp_path / "serve.yaml")]))
    from_flags = from_options(ServeConfig, parse(["serve", "R", "--port", "8123", "--max-batch", "8", "--dtype", "int8",
                                                  "--request-timeout", "2.5"]))
    assert from_file == from_flags and from_file.port == 8123 and from_file.max_queue == ServeConfig(run="R").max_queue
    (tmp_path / "bad.yaml").write_text("port: 70000\n")
    err = _one_line_error(capsys, main(["serve", "R", "--config", str(tmp_path / "bad.yaml")]))
    assert "--port" in err
