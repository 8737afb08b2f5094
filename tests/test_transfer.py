"""Continued pretraining (--init-from) and corpus normalisation: the two pieces transfer learning
on real corpora needs (pretrain on books, continue on reviews; make reviews read like SST-2)."""

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gptn.checkpoint import checkpoint_dir, load_model
from gptn.cli import main
from gptn.data import prepare
from gptn.finetune import FinetuneConfig, finetune, input_sequences, load_task_model, predict, read_task_file
from gptn.normalize import normalize, parse_steps
from gptn.pretrain import PretrainConfig, pretrain
from gptn.tokenizer import load_tokenizer

TEXT = "".join(f"Line {i}: the quick brown fox jumps over the lazy dog, {i % 7} times.\n" for i in range(2000))
TINY = {"n_layer": 2, "n_head": 2, "d_model": 32, "n_ctx": 32, "dropout": 0.0}
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpora")
    (root / "a.txt").write_text(TEXT)
    (root / "b.txt").write_text(TEXT.upper())
    prepare([str(root / "a.txt")], "char", root / "a", val_fraction=0.1, progress=False)
    # The same tokenizer, on other text: what continued pretraining needs.
    prepare([str(root / "a.txt")], str(root / "a" / "tokenizer"), root / "a2", val_fraction=0.1, progress=False)
    prepare([str(root / "b.txt")], "char", root / "b", val_fraction=0.1, progress=False)
    return root


@pytest.fixture(scope="module")
def source_run(corpora):
    run = corpora / "src"
    pretrain(PretrainConfig(corpus=str(corpora / "a"), out=str(run), preset="tiny", overrides=dict(TINY), steps=30,
                            batch_tokens=32 * 8, lr=3e-3, optimizer="muon", eval_interval=0, checkpoint_interval=30,
                            progress=False))
    return run


def test_init_from_starts_at_the_source_weights_with_a_fresh_optimizer(corpora, source_run, tmp_path):
    out = tmp_path / "continued"
    pretrain(PretrainConfig(corpus=str(corpora / "a2"), out=str(out), init_from=str(source_run), steps=1,
                            lr=1e-12, muon_lr=1e-12, warmup_steps=0, min_lr=1e-12, eval_interval=0, progress=False,
                            batch_tokens=32 * 8))
    src, _ = load_model(source_run)
    new, _ = load_model(out)
    x = torch.randint(0, src.config.vocab_size, (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(new(x), src(x), atol=1e-5, rtol=1e-5)  # one step at lr 1e-12 moves nothing
    state = torch.load(checkpoint_dir(out) / "train_state.pt", weights_only=False)
    source_state = torch.load(checkpoint_dir(source_run) / "train_state.pt", weights_only=False)
    assert state["step"] == 1 and source_state["step"] == 30
    assert state["scheduler"]["total"] == 1
    # Fresh optimizer: AdamW's step count restarted (1, not 31).
    adam_steps = [float(s["step"]) for s in state["optimizer"]["state"].values()]
    assert adam_steps and set(adam_steps) == {1.0}
    assert json.loads((out / "checkpoint" / "train_config.json").read_text())["init_from"] == str(source_run)


def test_init_from_then_training_moves_away_from_the_source(corpora, source_run, tmp_path):
    out = tmp_path / "continued"
    summary = pretrain(PretrainConfig(corpus=str(corpora / "a2"), out=str(out), init_from=str(source_run), steps=10,
                                      lr=3e-3, optimizer="adamw", eval_interval=10, progress=False,
                                      batch_tokens=32 * 8, overrides={"n_ctx": 16}))
    assert summary["steps"] == 10 and summary["start_step"] == 0
    new = load_file(str(checkpoint_dir(out) / "model.safetensors"))
    old = load_file(str(checkpoint_dir(source_run) / "model.safetensors"))
    assert new["wpe.weight"].shape[0] == 16  # the context was shrunk: W_p cropped
    assert not torch.equal(new["h.0.attn.c_attn.weight"], old["h.0.attn.c_attn.weight"])
    # Re-running resumes it (finished: nothing to do), it does not restart from the source.
    again = pretrain(PretrainConfig(corpus=str(corpora / "a2"), out=str(out), init_from=str(source_run), steps=10,
                                    eval_interval=0, progress=False))
    assert again["start_step"] == 10 and again["steps"] == 10


def test_init_from_a_fine_tuned_run(corpora, source_run, tmp_path):
    train = tmp_path / "train.tsv"
    train.write_text("sentence\tlabel\n" + "".join(f"the quick fox {i}\t{i % 2}\n" for i in range(20)))
    finetune(FinetuneConfig(run=str(source_run), out=str(tmp_path / "ft"), train=str(train), epochs=1,
                            progress=False))
    out = tmp_path / "continued"
    pretrain(PretrainConfig(corpus=str(corpora / "a2"), out=str(out), init_from=str(tmp_path / "ft"), steps=2,
                            eval_interval=0, progress=False, batch_tokens=32 * 8))
    model, tok = load_model(out)
    assert model.config.vocab_size == tok.vocab_size  # GPT-1's three tokens came along


@pytest.mark.parametrize("problem, message", [
    ({"corpus": "b"}, "another tokenizer"),
    ({"overrides": {"n_ctx": 64}}, "longer than the source's 32"),
    ({"overrides": {"d_model": 64}}, "would change the source model's shape"),
    ({"preset": "mini"}, "drop --preset"),
])
def test_init_from_refuses_what_cannot_work(corpora, source_run, tmp_path, problem, message, capsys):
    args = ["pretrain", str(corpora / problem.get("corpus", "a2")), "--out", str(tmp_path / "x"),
            "--init-from", str(source_run), "--steps", "2", "--no-progress"]
    for k, v in problem.get("overrides", {}).items():
        args += ["--set", f"{k}={v}"]
    if "preset" in problem:
        args += ["--preset", problem["preset"]]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and "Traceback" not in err


def test_init_from_an_imported_hugging_face_model(tmp_path):
    transformers = pytest.importorskip("transformers", reason="the hf extra (transformers) is not installed")
    from gptn.hf import export_hf
    from gptn.tokenizer import train_bpe
    tok = train_bpe([TEXT], 300)
    (tmp_path / "t.txt").write_text(TEXT)
    tok.save(tmp_path / "tok")
    prepare([str(tmp_path / "t.txt")], str(tmp_path / "tok"), tmp_path / "c", val_fraction=0.1, progress=False)
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=tok.vocab_size, n_positions=32, n_embd=32,
                                                              n_layer=2, n_head=2))
    hf.save_pretrained(tmp_path / "hf")
    from gptn.tokenizer import copy_hf_tokenizer_files
    copy_hf_tokenizer_files(tok, tmp_path / "hf", n_ctx=32)
    assert main(["import-hf", str(tmp_path / "hf"), str(tmp_path / "imported")]) == 0
    assert main(["pretrain", str(tmp_path / "c"), "--out", str(tmp_path / "run"), "--init-from",
                 str(tmp_path / "imported"), "--steps", "3", "--batch-tokens", "64", "--no-progress"]) == 0
    model, _ = load_model(tmp_path / "run")
    assert model.config.n_ctx == 32 and model.config.d_model == 32
    export_hf(tmp_path / "run", tmp_path / "back")  # and it goes back to Hugging Face


def test_extending_a_finished_run_says_the_schedule_changes(corpora, source_run, tmp_path, capsys):
    import shutil
    run = tmp_path / "run"
    shutil.copytree(source_run, run)
    assert main(["pretrain", str(corpora / "a"), "--out", str(run), "--steps", "30", "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "is finished at step 30" in captured.err and "nothing to train" in captured.out
    assert main(["pretrain", str(corpora / "a"), "--out", str(run), "--steps", "34", "--no-progress"]) == 0
    assert "from 30 to 34 steps: the cosine schedule is stretched" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# Normalisation


def test_sst_normalisation_makes_a_review_read_like_sst2():
    steps = parse_steps("sst")
    review = 'A gorgeous, witty, seductive movie.<br /><br />It\'s "great" -- I didn\'t expect that...'
    assert normalize(review, steps) == ("a gorgeous , witty , seductive movie . it 's `` great '' -- "
                                        "i did n't expect that ...")
    sst = "it 's a charming and often affecting journey ."
    assert normalize(sst, steps) == sst  # SST-2's own text is a fixed point
    assert parse_steps("lower,html") == ("html", "lower")
    with pytest.raises(Exception, match="unknown step 'upper'"):
        parse_steps("upper")


@pytest.mark.parametrize("run", [" ", "\t", " \n", ".", ",", "<br", "'s", '"', "<a"])
def test_normalisation_is_linear_in_runs_of_any_character(run):
    import time
    text = "a" + run * 100_000 + "b"  # a quadratic step takes minutes here (10k spaces took 2.6 s)
    start = time.perf_counter()
    normalize(text, parse_steps("sst"))
    assert time.perf_counter() - start < 3


def test_normalisation_is_applied_alike_at_prepare_finetune_and_predict(tmp_path, capsys):
    raw = "A Gorgeous, WITTY movie.<br />Loved it!"
    (tmp_path / "reviews.jsonl").write_text("".join(json.dumps({"text": raw}) + "\n" for _ in range(30)))
    assert main(["prepare", str(tmp_path / "reviews.jsonl"), "--tokenizer", "char", "--normalize", "sst",
                 "--out", str(tmp_path / "c"), "--val-fraction", "0"]) == 0
    assert "normalised (html,lower,punct)" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert manifest["tokenizer"]["normalize"] == ["html", "lower", "punct"]
    tok = load_tokenizer(tmp_path / "c" / "tokenizer")
    # The character tokenizer was built from normalised text: no capitals, no '<'.
    assert "G" not in tok.chars and "<" not in tok.chars
    expected = "a gorgeous , witty movie . loved it !"
    from gptn.data import Corpus
    shard = Corpus(tmp_path / "c").shards("train")[0]
    assert tok.decode(shard[:len(expected)].tolist()) == expected  # prepare
    assert tok.encode(raw) == tok.encode(expected)  # every later encode

    pretrain(PretrainConfig(corpus=str(tmp_path / "c"), out=str(tmp_path / "run"), preset="tiny",
                            overrides=dict(TINY), steps=2, batch_tokens=64, eval_interval=0, progress=False))
    train = tmp_path / "train.jsonl"
    train.write_text(json.dumps({"text": "A GORGEOUS movie!", "label": 1}) + "\n"
                     + json.dumps({"text": "a witty , movie .", "label": 0}) + "\n")
    finetune(FinetuneConfig(run=str(tmp_path / "run"), out=str(tmp_path / "ft"), train=str(train), epochs=1,
                            progress=False))
    model, ft_tok = load_task_model(tmp_path / "ft")
    assert ft_tok.normalize == ("html", "lower", "punct")
    example = read_task_file(train).examples[0]
    assert input_sequences("classification", example, ft_tok, 32)[0][1:-1] == ft_tok.encode("a gorgeous movie !")
    same = predict(model, ft_tok, read_task_file(train).examples[:1])[0]["probs"]
    (tmp_path / "norm.jsonl").write_text(json.dumps({"text": "a gorgeous movie !", "label": 1}) + "\n")
    assert predict(model, ft_tok, read_task_file(tmp_path / "norm.jsonl").examples)[0]["probs"] == same


@pytest.mark.parametrize("args, message", [
    (["--shape", "4x100"], "--shape: blocks x width (the width a multiple of 64), e.g. 4x256, not '4x100'"),
    (["--vocab", "4096"], "--vocab 4096: {work} holds a corpus of 8192 tokens"),
    (["--shape", "4x192"], "--shape 4x192: {work} holds a 4x256 model"),
    (["--candidates", "{work}"], "--candidates: no finished SST-2 search in {work}"),
    (["--books-seconds", "600"], "--books-seconds 600: {work} was pretrained with 0"),
    (["--vocab", "100", "--work", "{work}/new"], "bpe:100: a byte-level BPE needs at least 257 tokens"),
])
def test_the_transfer_benchmark_refuses_a_work_folder_of_another_run_in_one_line(tmp_path, args, message, monkeypatch,
                                                                                 capsys):
    # Resuming a --work folder with another shape, vocabulary or corpus would report its cells under the wrong name.
    work = tmp_path / "work"
    (work / "imdb-corpus").mkdir(parents=True)
    (work / "imdb-corpus" / "manifest.json").write_text(json.dumps({"tokenizer": {"vocab_size": 8192}}))
    (work / "pretrained-imdb" / "checkpoint").mkdir(parents=True)
    (work / "pretrained-imdb" / "checkpoint" / "config.json").write_text(json.dumps({"n_layer": 4, "d_model": 256}))
    (work / "plan.json").write_text(json.dumps({"imdb": {"seconds": 2400}}))
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    monkeypatch.setattr(sys, "argv", ["transfer.py", "--work", str(work), *[a.format(work=work) for a in args]])
    import transfer
    with pytest.raises(SystemExit) as exit:
        transfer.main()
    assert exit.value.code == 2
    assert message.format(work=work) in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (work / "starts.json").exists()  # nothing was started


def test_self_training_adds_the_most_confident_half_of_each_class_the_teacher_predicts(source_run, tmp_path, monkeypatch):
    # benchmarks/transfer.py's self-training: the labels stay as they are, and the teacher's pseudo-labels are
    # drawn from the unlabeled texts outside them, half of each predicted class.
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import transfer

    lines = TEXT.splitlines()
    labeled = [{"text": line, "label": "low" if i % 7 < 3 else "high"} for i, line in enumerate(lines[:32])]
    train = transfer._write_jsonl(tmp_path / "train.jsonl", labeled)
    pool = lines[24:64]  # 8 of them are labeled: never pseudo-labeled
    unlabeled = transfer._write_jsonl(tmp_path / "pool.jsonl", [{"text": t} for t in pool])
    path, teacher = transfer.with_pseudo_labels(tmp_path, source_run, train, None, unlabeled, 0.5, epochs=2,
                                                batch_size=8, lr=3e-3, lm_weight=0.0)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows[:32] == labeled
    added = rows[32:]
    assert teacher["pool"] == 32 and teacher["added"] == len(added)
    assert {r["text"] for r in added} <= set(lines[32:64]) and len({r["text"] for r in added}) == len(added)
    assert {r["label"] for r in added} <= {"low", "high"}
    assert 15 <= len(added) <= 16  # half of each class, rounded down
    assert not (tmp_path / "teacher").exists()  # the teacher's weights are not left behind
