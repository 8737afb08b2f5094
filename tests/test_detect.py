"""gptn detect: GLTR's per-token ranks under a run's model, and a fitted probability of machine text."""

import json
import random

import pytest
import torch

from gptn.checkpoint import save_checkpoint
from gptn.cli import main
from gptn.config import GPTConfig
from gptn.detect import Detector, token_stats
from gptn.generate import generate
from gptn.sampling import SamplingConfig
from gptn.scoring import score
from gptn.model import GPT
from gptn.tokenizer import CharTokenizer

ALPHABET = "abcdefghijklmnopqrstuvwxyz "


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tok = CharTokenizer.from_text(ALPHABET)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, n_ctx=32, n_layer=2, n_head=2, d_model=32, dropout=0.0)).eval()
    with torch.no_grad():
        model.wte.weight.mul_(20)  # a peaked model: its greedy text is far from random text
    path = tmp_path_factory.mktemp("detect") / "run"
    save_checkpoint(path, model.config, model.state_dict(), tokenizer=tok)
    return path, model, tok


def test_token_stats_agree_with_the_scorer_and_rank_the_argmax_first(run):
    _, model, tok = run
    text = "the quick brown fox jumps over the lazy dog " * 3  # longer than the context: read in windows
    stats = token_stats(model, tok, text)
    assert stats.tokens == tok.encode(text) and len(stats.ranks) == len(stats.tokens)
    assert stats.logprobs == pytest.approx(score(model, tok, text).logprobs, abs=1e-4)
    ids = [tok.eot_id] + tok.encode(text)
    with torch.no_grad():
        first = model(torch.tensor([ids[:20]]))[0]
    expected = [int((row > row[t]).sum()) + 1 for row, t in zip(first, ids[1:20])]
    assert stats.ranks[:19] == expected
    feats = stats.features()
    assert feats["top10"] + feats["top100"] + feats["top1000"] + feats["rest"] == pytest.approx(1.0)
    assert all(e >= 0 for e in stats.entropies)


def test_fit_then_detect_tells_greedy_text_from_random_text(run, tmp_path, capsys):
    path, model, tok = run
    rng = random.Random(0)
    human = ["".join(rng.choice(ALPHABET) for _ in range(40)) for _ in range(12)]
    machine = [p + o[0] for p, o in zip(human, generate(model, tok, [h[:4] for h in human],
                                                        SamplingConfig(max_new_tokens=36, greedy=True)))]
    for name, docs in (("human.jsonl", human), ("machine.jsonl", machine)):
        (tmp_path / name).write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    assert main(["detect", str(path), "--fit", str(tmp_path / "human.jsonl"), str(tmp_path / "machine.jsonl")]) == 0
    assert "training accuracy 100.0%" in capsys.readouterr().out and (path / "detector.json").exists()
    assert main(["detect", str(path), str(tmp_path / "machine.jsonl"), "--json"]) == 0
    machine_p = [json.loads(x)["machine_probability"] for x in capsys.readouterr().out.splitlines()]
    assert main(["detect", str(path), "--text", "zqx jvw kkpo yrt abc", "--tokens"]) == 0
    out = capsys.readouterr().out
    assert "P(machine-generated)" in out and ("[rest]" in out or "[top10]" in out)
    assert min(machine_p) > 0.5
    d = Detector.load(path / "detector.json")
    assert d.coef == pytest.approx(json.loads((path / "detector.json").read_text())["coef"])
    (tmp_path / "bad.json").write_text("[1, 2]")
    assert main(["detect", str(path), "--text", "abc", "--detector", str(tmp_path / "bad.json")]) == 2
    assert "not a detector" in capsys.readouterr().err
