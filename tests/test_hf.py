import json

import pytest
import torch
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers", reason="the hf extra (transformers) is not installed")

from gptn.checkpoint import load_model  # noqa: E402
from gptn.cli import main  # noqa: E402


def _hf_model(kind):
    torch.manual_seed(0)
    if kind == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=101, n_positions=24, n_embd=32, n_layer=2, n_head=4,
                                      bos_token_id=100, eos_token_id=100)
        model = transformers.GPT2LMHeadModel(cfg)
    else:
        cfg = transformers.OpenAIGPTConfig(vocab_size=101, n_positions=24, n_embd=32, n_layer=2, n_head=4)
        model = transformers.OpenAIGPTLMHeadModel(cfg)
    # Random LayerNorm parameters too, so that a swapped ln_1/ln_2 would be caught.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ln" in name:
                p.normal_(1.0 if name.endswith("weight") else 0.0, 0.2)
    return model.eval()


@pytest.mark.parametrize("kind", ["gpt2", "openai-gpt"])
def test_import_and_export_parity(kind, tmp_path):
    hf = _hf_model(kind)
    hf.save_pretrained(tmp_path / "hf")
    idx = torch.randint(0, 101, (2, 24))
    with torch.no_grad():
        ref = hf(idx).logits

    assert main(["import-hf", str(tmp_path / "hf"), str(tmp_path / "run")]) == 0
    model, _ = load_model(tmp_path / "run")
    assert model.config.norm == ("pre" if kind == "gpt2" else "post")
    with torch.no_grad():
        torch.testing.assert_close(model(idx), ref, atol=1e-5, rtol=1e-5)

    assert main(["export-hf", str(tmp_path / "run"), str(tmp_path / "out")]) == 0
    back, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert info["missing_keys"] in ([], set()) and not info["unexpected_keys"]
    assert type(back) is type(hf)
    with torch.no_grad():
        torch.testing.assert_close(back.eval()(idx).logits, ref, atol=1e-5, rtol=1e-5)


def test_export_model_without_biases_gives_same_logits(tmp_path):
    from gptn.checkpoint import save_checkpoint
    from gptn.config import GPTConfig
    from gptn.model import GPT
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, n_ctx=16, n_layer=2, n_head=2, d_model=16, bias=False, dropout=0.0)).eval()
    save_checkpoint(tmp_path / "run", model.config, model.state_dict())
    assert main(["export-hf", str(tmp_path / "run"), str(tmp_path / "out")]) == 0
    back, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"]
    idx = torch.randint(0, 50, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(back.eval()(idx).logits, model(idx), atol=1e-5, rtol=1e-5)


def test_not_a_checkpoint_is_one_line_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["import-hf", str(tmp_path / "empty"), str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert "no config.json" in err and "\n" not in err

    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    assert main(["import-hf", str(tmp_path / "bert"), str(tmp_path / "run")]) == 2
    assert "not a GPT-2" in capsys.readouterr().err

    assert main(["import-hf", str(tmp_path / "nowhere"), str(tmp_path / "run")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_missing_tensor_is_named(tmp_path, capsys):
    hf = _hf_model("gpt2")
    hf.save_pretrained(tmp_path / "hf")
    weights = load_file(str(tmp_path / "hf" / "model.safetensors"))
    del weights["transformer.h.1.mlp.c_fc.weight"]
    save_file(weights, str(tmp_path / "hf" / "model.safetensors"))
    assert main(["import-hf", str(tmp_path / "hf"), str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "missing tensors" in err and "h.1.mlp.c_fc.weight" in err
    assert not (tmp_path / "run").exists()


def test_import_pytorch_model_bin(tmp_path):
    hf = _hf_model("gpt2")
    (tmp_path / "hf").mkdir()
    hf.config.to_json_file(tmp_path / "hf" / "config.json")
    torch.save(hf.state_dict(), tmp_path / "hf" / "pytorch_model.bin")
    assert main(["import-hf", str(tmp_path / "hf"), str(tmp_path / "run")]) == 0
    model, _ = load_model(tmp_path / "run")
    idx = torch.randint(0, 101, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), hf(idx).logits, atol=1e-5, rtol=1e-5)


TEXT = "Hello, world!\n  The cat's hat -- 3.14 ümlaut 日本\n\nend. "


def _tokenizer(kind):
    from conftest import require_shared

    from gptn.tokenizer import CharTokenizer, load_tokenizer, train_bpe
    if kind == "char":
        return CharTokenizer.from_text(TEXT + "xyz")
    if kind == "bpe":
        return train_bpe([TEXT * 3, "some more text here"], 300)
    return load_tokenizer(require_shared() / "gpt2-bpe")


@pytest.mark.parametrize("kind", ["char", "bpe", "gpt2"])
def test_exported_tokenizer_gives_gptns_ids_and_specials(kind, tmp_path):
    from conftest import tiny_gpt

    from gptn.checkpoint import save_checkpoint
    from gptn.tokenizer import load_tokenizer
    tok = _tokenizer(kind).add_special_tokens()  # GPT-1's start / delimiter / extract too
    model = tiny_gpt(tok.vocab_size, n_ctx=40)
    save_checkpoint(tmp_path / "run", model.config, model.state_dict(), tokenizer=tok)
    assert main(["export-hf", str(tmp_path / "run"), str(tmp_path / "hf")]) == 0
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    ids = hf.encode(TEXT)
    assert ids == tok.encode(TEXT) and hf.decode(ids) == TEXT
    framed = "He<|start|>cat<|delim|>hat<|extract|>"
    assert hf.encode(framed) == tok.encode(framed, allow_special=True)  # one id each, not split into bytes
    assert {"<|start|>", "<|delim|>", "<|extract|>", "<|endoftext|>"} <= set(hf.all_special_tokens)
    assert hf.model_max_length == 40 and hf.eos_token == "<|endoftext|>"
    assert load_tokenizer(tmp_path / "hf").encode(TEXT) == tok.encode(TEXT)  # and back: import-hf reads it


@pytest.mark.parametrize("norm, task", [("pre", "classification"), ("post", "entailment")])
def test_finetuned_run_exports_as_a_text_classification_pipeline(norm, task, tmp_path, capsys):
    # GPT-2 (pre-LN) -> GPT2ForSequenceClassification, GPT-1 (post-LN) -> OpenAIGPTForSequenceClassification:
    # the exported tokenizer frames the input like GPT-1 and the model reads the extract token, so the
    # pipeline's labels and probabilities are gptn predict's.
    from gptn.checkpoint import save_checkpoint
    from gptn.config import GPTConfig
    from gptn.finetune import FinetuneConfig, finetune, load_task_model, predict, read_task_file
    from gptn.model import GPT
    from gptn.tokenizer import CharTokenizer
    tok = CharTokenizer.from_text("abcdefghijklmnopqrstuvwxyz ")
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(vocab_size=tok.vocab_size, n_ctx=48, n_layer=2, n_head=2, d_model=32, dropout=0.0, norm=norm))
    save_checkpoint(tmp_path / "pre", gpt.config, gpt.state_dict(), tokenizer=tok)
    words = ["good", "great", "nice", "bad", "awful", "poor"]
    if task == "classification":
        rows = ["sentence\tlabel"] + [f"the {w} movie\t{'pos' if i % 6 < 3 else 'neg'}" for i, w in enumerate(words * 4)]
    else:
        rows = ["sentence1\tsentence2\tlabel"] + [f"it was {w}\tit was {v}\t{'same' if w == v else 'other'}"
                                                  for w in words for v in words]
    (tmp_path / "train.tsv").write_text("\n".join(rows) + "\n")
    finetune(FinetuneConfig(run=str(tmp_path / "pre"), out=str(tmp_path / "ft"), train=str(tmp_path / "train.tsv"),
                            epochs=3, batch_size=8, lr=3e-3, progress=False))
    model, gtok = load_task_model(tmp_path / "ft")
    assert model.head.bias.abs().max() > 1e-3  # trained: the folded bias matters
    assert main(["export-hf", str(tmp_path / "ft"), str(tmp_path / "hf")]) == 0
    assert "folded" in capsys.readouterr().err
    steps = 3 * -(-(len(rows) - 1) // 8)
    assert f"the final model after {steps} steps (no validation set)" in (tmp_path / "hf" / "README.md").read_text()

    clf = transformers.pipeline("text-classification", model=str(tmp_path / "hf"), top_k=None)
    assert type(clf.model).__name__ == ("GPT2" if norm == "pre" else "OpenAIGPT") + "ForSequenceClassification"
    examples = read_task_file(tmp_path / "train.tsv").examples[:6]
    want = predict(model, gtok, examples)
    inputs = [x.segments[0] if task == "classification" else {"text": x.segments[0], "text_pair": x.segments[1]}
              for x in examples]
    for got, ref in zip(clf(inputs), want):
        assert max(got, key=lambda g: g["score"])["label"] == ref["prediction"]
        assert {g["label"]: g["score"] for g in got} == pytest.approx(ref["probs"], abs=1e-5)


def test_a_finetuned_run_hf_cannot_express_is_refused_in_one_line(tmp_path, capsys):
    from gptn.checkpoint import save_checkpoint
    from gptn.config import GPTConfig
    from gptn.finetune import FinetuneConfig, finetune
    from gptn.model import GPT
    from gptn.tokenizer import CharTokenizer
    tok = CharTokenizer.from_text("abcdefghijklmnopqrstuvwxyz ")
    gpt = GPT(GPTConfig(vocab_size=tok.vocab_size, n_ctx=32, n_layer=1, n_head=2, d_model=16, dropout=0.0))
    save_checkpoint(tmp_path / "pre", gpt.config, gpt.state_dict(), tokenizer=tok)
    (tmp_path / "train.tsv").write_text("sentence\tlabel\nthe good\tpos\nthe bad\tneg\n")
    finetune(FinetuneConfig(run=str(tmp_path / "pre"), out=str(tmp_path / "ft"), train=str(tmp_path / "train.tsv"),
                            epochs=1, pooling="mean", progress=False))
    capsys.readouterr()  # fine-tuning's evaluation line
    assert main(["export-hf", str(tmp_path / "ft"), str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--pooling extract" in err and not (tmp_path / "hf").exists()


def test_export_writes_a_generation_config_and_a_model_card(tmp_path):
    from gptn.data import prepare
    from gptn.pretrain import PretrainConfig, pretrain
    (tmp_path / "t.txt").write_text("the quick brown fox jumps over the lazy dog. " * 300)
    prepare([str(tmp_path / "t.txt")], "char", tmp_path / "c", val_fraction=0.1, progress=False)
    pretrain(PretrainConfig(corpus=str(tmp_path / "c"), out=str(tmp_path / "run"), preset="tiny",
                            overrides={"n_ctx": 32}, steps=20, batch_tokens=256, eval_interval=10, progress=False))
    assert main(["export-hf", str(tmp_path / "run"), str(tmp_path / "out")]) == 0
    model, tok = load_model(tmp_path / "run")
    gen = transformers.GenerationConfig.from_pretrained(tmp_path / "out")
    assert gen.eos_token_id == gen.pad_token_id == tok.eot_id and gen.max_length == 32
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    generated = hf.generate(**hf_tok("the", return_tensors="pt"))  # max_length from generation_config.json
    assert generated.shape[1] == 32 or generated[0, -1].item() == tok.eot_id
    card = (tmp_path / "out" / "README.md").read_text()
    val = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if "val_loss" in x][-1]
    assert f"validation loss {val['val_loss']:.4f}" in card and "20 steps of 256 tokens: 5,120 training tokens" in card
    assert f"{model.num_parameters():,} parameters" in card and "AutoModelForCausalLM.from_pretrained" in card
    assert "pre-LayerNorm" in card and f"{tok.vocab_size:,} tokens" in card
