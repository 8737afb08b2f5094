"""The lecture's points a learner can see with one command: the model as the lecture draws it
(`gptn inspect`), the inputs GPT-1 builds (`predict --show-inputs`), and BERT filling a masked word."""

import json

import pytest
import torch

from gptn.bert import BERT_SPECIALS
from gptn.checkpoint import save_checkpoint
from gptn.cli import main
from gptn.config import GPTConfig
from gptn.data import prepare
from gptn.finetune import FinetuneConfig, finetune
from gptn.model import GPT
from gptn.pretrain import PretrainConfig, pretrain
from gptn.tokenizer import CharTokenizer

ALPHABET = "abcdefghijklmnopqrstuvwxyz .,"


def _run(tmp_path, arch="gpt", norm="pre"):
    tok = CharTokenizer.from_text(ALPHABET)
    if arch == "bert":
        tok.add_special_tokens(BERT_SPECIALS)
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(vocab_size=tok.vocab_size, n_ctx=32, n_layer=2, n_head=2, d_model=32, dropout=0.0, arch=arch,
                        norm=norm))
    save_checkpoint(tmp_path / arch, gpt.config, gpt.state_dict(), tokenizer=tok)
    return tmp_path / arch, gpt


@pytest.mark.parametrize("arch, norm", [("gpt", "pre"), ("gpt", "post"), ("bert", "pre")])
def test_inspect_draws_the_lectures_equations_parameters_and_mask(tmp_path, capsys, arch, norm):
    run, gpt = _run(tmp_path, arch, norm)
    assert main(["inspect", str(run), "--text", "the cat", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    mask = torch.tensor(info["mask"])
    assert mask.shape == (7, 7)
    if arch == "gpt":
        assert torch.equal(mask, torch.ones(7, 7, dtype=torch.long).tril())  # causal: lower-triangular
    else:
        assert bool(mask.all())  # bidirectional
    assert sum(info["parameters"].values()) == info["total_parameters"] == gpt.num_parameters()
    eq = "\n".join(info["equations"])
    assert "h0 = U·W_e + W_p" in eq and "softmax(h_n·W_e^T)" in eq and "32 x 32" in eq
    assert ("pre-LN" in eq and "final LayerNorm" in eq) if norm == "pre" else ("post-LN" in eq and "no final" in eq)
    assert main(["inspect", str(run), "--text", "the cat"]) == 0
    text = capsys.readouterr().out
    assert ("lower-triangular" if arch == "gpt" else "bidirectional: full") in text
    grid = text.split("may attend):\n")[1].splitlines()[1:8]  # after the header row of column labels
    assert [row.count("■") for row in grid] == ([1, 2, 3, 4, 5, 6, 7] if arch == "gpt" else [7] * 7)


def test_inspect_and_show_inputs_of_a_fine_tuned_similarity_run(tmp_path, capsys):
    run, _ = _run(tmp_path)
    rows = ["sentence1\tsentence2\tlabel"] + [f"a cat\ta cat sat\t{i % 2}" for i in range(8)]
    (tmp_path / "sim.tsv").write_text("\n".join(rows) + "\n")
    finetune(FinetuneConfig(run=str(run), out=str(tmp_path / "ft"), train=str(tmp_path / "sim.tsv"),
                            task="similarity", epochs=1, batch_size=8, progress=True))
    assert "<|start|>a cat<|delim|>a cat sat<|extract|>" in capsys.readouterr().err  # finetune's first lines
    assert main(["inspect", str(tmp_path / "ft"), "--text", "a cat", "--json"]) == 0
    head = json.loads(capsys.readouterr().out)["head"]
    assert head["task"] == "similarity" and head["linear"] == "32 -> 2" and head["reads"] == "h_n at the extract token"
    assert main(["predict", str(tmp_path / "ft"), "--text", "one", "--text-b", "two", "--show-inputs"]) == 0
    out = capsys.readouterr().out
    assert "A then B: '<|start|>one<|delim|>two<|extract|>'" in out
    assert "B then A: '<|start|>two<|delim|>one<|extract|>'" in out


def test_bert_fills_a_masked_word_it_saw_in_that_slot(tmp_path, capsys):
    (tmp_path / "t.txt").write_text("the cat sat on the mat. " * 400)
    prepare([str(tmp_path / "t.txt")], "char", tmp_path / "c", val_fraction=0.1, progress=False)
    pretrain(PretrainConfig(corpus=str(tmp_path / "c"), out=str(tmp_path / "bert"), preset="tiny",
                            overrides={"n_ctx": 32, "dropout": 0.0, "arch": "bert"}, steps=150, batch_tokens=32 * 16, lr=3e-3,
                            eval_interval=0, progress=False))
    assert main(["next", str(tmp_path / "bert"), "the cat s[MASK]t on the mat", "--words", "a,o,e", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    vocab = len(set("the cat sat on the mat. "))
    a = out["words"][0]
    assert a["rank"] <= vocab // 2 and a["prob"] > 1 / vocab  # above chance: the slot held "a" in training
    assert sum(w["share"] for w in out["words"]) == pytest.approx(1.0)
    assert main(["next", str(tmp_path / "bert"), "no mask here"]) == 2
    assert "[MASK]" in capsys.readouterr().err
