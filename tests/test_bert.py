import pytest
import torch

from gptn.bert import BERT_SPECIALS, CLS, MASK, SEP, mask_tokens
from gptn.checkpoint import load_model, save_checkpoint
from gptn.cli import main
from gptn.config import GPTConfig
from gptn.finetune import Example, FinetuneConfig, finetune, input_sequences
from gptn.model import GPT
from gptn.tokenizer import CharTokenizer

ALPHABET = "abcdefghijklmnopqrstuvwxyz .,\n"


def _config(arch, vocab=40):
    return GPTConfig(vocab_size=vocab, n_ctx=32, n_layer=2, n_head=2, d_model=32, dropout=0.0, arch=arch)


@pytest.mark.parametrize("arch, sees_future", [("bert", True), ("gpt", False)])
def test_encoder_attends_to_later_tokens_and_decoder_does_not(arch, sees_future):
    torch.manual_seed(0)
    model = GPT(_config(arch)).eval()
    x = torch.randint(0, 40, (1, 12))
    y = x.clone()
    y[0, 9] = (x[0, 9] + 1) % 40  # change a later token
    with torch.no_grad():
        hx, hy = model.hidden_states(x), model.hidden_states(y)
    changed_before = not torch.allclose(hx[0, :9], hy[0, :9])
    assert changed_before == sees_future
    assert not torch.allclose(hx[0, 9:], hy[0, 9:])


def test_masking_proportions_are_bert_s():
    tok = CharTokenizer.from_text(ALPHABET).add_special_tokens(BERT_SPECIALS)
    ids = torch.randint(0, tok.base_vocab_size, (256, 512))
    inputs, targets = mask_tokens(ids, tok, torch.Generator().manual_seed(0))
    assert (inputs[:, 0] == tok.special_tokens[CLS]).all() and (targets[:, 0] == -100).all()
    chosen = targets != -100
    body = chosen[:, 1:].numel()
    assert abs(chosen.sum().item() / body - 0.15) < 0.01
    n = chosen.sum().item()
    masked = (inputs == tok.special_tokens[MASK]) & chosen
    kept = (inputs == ids) & chosen
    randomised = chosen & ~masked & ~kept
    assert abs(masked.sum().item() / n - 0.80) < 0.01
    # a random replacement can draw the original token (1 in 30 here): it then counts as kept
    assert abs(kept.sum().item() / n - 0.10) < 0.01 + 0.1 / 30
    assert abs(randomised.sum().item() / n - 0.10) < 0.01
    assert (targets[chosen] == ids[chosen]).all()


def test_encoder_inputs_start_with_cls_and_separate_segments():
    tok = CharTokenizer.from_text(ALPHABET).add_special_tokens(BERT_SPECIALS)
    c, s = tok.special_tokens[CLS], tok.special_tokens[SEP]
    assert input_sequences("entailment", Example(("ab", "c")), tok, 32, causal=False) == \
        [[c, *tok.encode("ab"), s, *tok.encode("c"), s]]


def _separable(path, n=32):
    words = ["good", "great", "fine", "nice", "bad", "awful", "poor", "sad"]
    rows = [f"the {words[i % 8]} film\t{'pos' if i % 8 < 4 else 'neg'}" for i in range(n)]
    path.write_text("sentence\tlabel\n" + "\n".join(rows) + "\n")


def test_tiny_encoder_fine_tunes_a_separable_task(tmp_path):
    tok = CharTokenizer.from_text(ALPHABET).add_special_tokens(BERT_SPECIALS)
    torch.manual_seed(0)
    model = GPT(_config("bert", tok.vocab_size))
    save_checkpoint(tmp_path / "bert", model.config, model.state_dict(), tokenizer=tok)
    _separable(tmp_path / "train.tsv")
    summary = finetune(FinetuneConfig(run=str(tmp_path / "bert"), out=str(tmp_path / "ft"),
                                      train=str(tmp_path / "train.tsv"), val=str(tmp_path / "train.tsv"),
                                      epochs=20, batch_size=8, lr=3e-3, dropout=0.0, head_dropout=0.0,
                                      progress=False))
    assert summary["best"]["value"] == 1.0


def test_pretrain_arch_bert_and_generate_refuses_it(tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text(("the cat sat on the mat. the dog ran. " * 80))
    assert main(["prepare", str(text), "--tokenizer", "char", "--out", str(tmp_path / "c")]) == 0
    assert main(["pretrain", str(tmp_path / "c"), "--out", str(tmp_path / "b"), "--arch", "bert", "--preset", "tiny",
                 "--set", "n_ctx=32", "--steps", "3", "--batch-tokens", "128", "--eval-interval", "3",
                 "--eval-batches", "1", "--no-progress"]) == 0
    model, tok = load_model(tmp_path / "b")
    assert model.config.arch == "bert" and all(t in tok.special_tokens for t in BERT_SPECIALS)
    assert model.config.vocab_size == tok.vocab_size
    capsys.readouterr()
    for args in (["generate", str(tmp_path / "b"), "--prompt", "the"], ["next", str(tmp_path / "b"), "the"]):
        assert main(args) == 2
        err = capsys.readouterr().err.strip()
        assert "BERT-style encoder" in err and "cannot" in err and len(err.splitlines()) == 1
