"""export-gguf: the file llama.cpp reads — loaded through llama-cpp-python, the way its users load a
model — gives gptn's tokens, greedy continuations and next-token log-probabilities."""
import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("gguf", reason="export-gguf needs the gguf extra (in dev)")
llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is in the dev extra")

from conftest import require_shared, tiny_gpt  # noqa: E402

from gptn.checkpoint import save_checkpoint  # noqa: E402
from gptn.cli import main  # noqa: E402
from gptn.generate import generate, generate_ids  # noqa: E402
from gptn.sampling import SamplingConfig  # noqa: E402
from gptn.tokenizer import CharTokenizer, load_tokenizer, train_bpe  # noqa: E402

TEXT = ("The cat sat on the mat. The dog ran after the cat, and the cat ran up a tree.\n"
        "Numbers like 12345 and 2026 appear; so do words like naïve, café and über.\n")
PROMPTS = ["The cat", "the dog ran", " spaced  out\n\nlines", "café 2026", "über naïve"]
# Log-probabilities of every next token, llama.cpp against gptn (max |difference| over positions x vocabulary):
# f32 is the same arithmetic; f16 rounds the weights (and llama.cpp the activations of f16 matmuls).
LOGPROB_TOLERANCE = {"f32": 1e-3, "f16": 5e-3}  # measured: 1.0e-4 and 7.4e-4


def _run(tmp_path, tokenizer, bias=True, name="run"):
    """A tiny pre-LN GPT over `tokenizer` with random LayerNorms (a swapped norm shows) and sharpened
    embeddings (well-defined greedy choices), saved as a run."""
    model = tiny_gpt(tokenizer.vocab_size, n_ctx=64, sharpen=True)
    if not bias:
        from gptn.model import GPT
        torch.manual_seed(0)
        model = GPT(model.config.replace(bias=False)).eval()
        with torch.no_grad():
            model.wte.weight.mul_(3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "ln" in n:
                p.normal_(1.0 if n.endswith("weight") else 0.0, 0.2)
    save_checkpoint(tmp_path / name, model.config, model.state_dict(), tokenizer=tokenizer)
    return model, tmp_path / name


def _llama(path, n_ctx=64):
    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, logits_all=True, n_threads=2, verbose=False)


def _logprobs_gptn(model, ids):
    with torch.no_grad():
        return F.log_softmax(model(torch.tensor([ids]))[0].float(), -1).numpy()


def _logprobs_llama(llm, ids):
    llm.reset()
    llm.eval(ids)
    logits = np.asarray(llm.scores[:len(ids)], dtype=np.float64)
    return logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)


def _parity(tmp_path, model, run, tokenizer):
    """{type: (max logprob difference, share of positions with the same top token)} after checking the
    tokens and greedy continuations."""
    out = {}
    for kind in ("f32", "f16", "q8_0"):
        path = tmp_path / f"{run.name}-{kind}.gguf"
        assert main(["export-gguf", str(run), str(path), "--type", kind]) == 0
        llm = _llama(path)
        diffs, same_top = [], []
        for prompt in PROMPTS:
            ids = tokenizer.encode(prompt)
            assert llm.tokenize(prompt.encode(), add_bos=False, special=False) == ids, prompt
            assert llm.detokenize(ids).decode() == prompt
            ours, theirs = _logprobs_gptn(model, ids), _logprobs_llama(llm, ids)
            diffs.append(float(np.abs(ours - theirs).max()))
            same_top += list(ours.argmax(-1) == theirs.argmax(-1))
            if kind != "q8_0":  # what a user of llama.cpp gets: the greedy tokens of `gptn generate`
                want = generate_ids(model, [ids], SamplingConfig(max_new_tokens=12, greedy=True))[0]
                got = list(itertools.islice(llm.generate(ids, top_k=1, temp=0.0, reset=True), len(want)))
                assert got == want, (kind, prompt)
                if "\ufffd" not in tokenizer.decode(want):  # and the same text (llama.cpp holds back broken UTF-8)
                    text = llm.create_completion(prompt, max_tokens=12, temperature=0.0)["choices"][0]["text"]
                    assert text == generate(model, tokenizer, [prompt], SamplingConfig(max_new_tokens=12,
                                                                                      greedy=True))[0][0], (kind, prompt)
        out[kind] = (max(diffs), float(np.mean(same_top)))
    return out


def test_own_bpe_run_in_llama_cpp(tmp_path):
    tokenizer = train_bpe([TEXT * 20], 320)
    model, run = _run(tmp_path, tokenizer)
    agreement = _parity(tmp_path, model, run, tokenizer)
    for kind, tolerance in LOGPROB_TOLERANCE.items():
        assert agreement[kind][0] < tolerance and agreement[kind][1] == 1.0, (kind, agreement)
    # q8_0 (documented in the README; measured 0.015-0.021 nats, 97-100%): within 0.1 nats, the same top
    # token at 95% of positions or more
    assert agreement["q8_0"][0] < 0.1 and agreement["q8_0"][1] >= 0.95, agreement


def test_gpt2_bpe_bias_free_run_in_llama_cpp(tmp_path):
    """GPT-2's own vocabulary (50,257 tokens, merges in rank order) and a model without biases (written
    as zeros: llama.cpp's GPT-2 requires them)."""
    tokenizer = load_tokenizer(require_shared() / "gpt2-bpe")
    model, run = _run(tmp_path, tokenizer, bias=False)
    agreement = _parity(tmp_path, model, run, tokenizer)
    for kind, tolerance in LOGPROB_TOLERANCE.items():
        assert agreement[kind][0] < tolerance and agreement[kind][1] == 1.0, (kind, agreement)


def test_what_llama_cpp_cannot_represent_is_refused_in_one_line(tmp_path, capsys):
    bpe = train_bpe([TEXT * 5], 300)
    _, run = _run(tmp_path, bpe)
    char = CharTokenizer.from_text(TEXT)
    char_model = tiny_gpt(char.vocab_size)
    save_checkpoint(tmp_path / "char", char_model.config, char_model.state_dict(), tokenizer=char)
    post = tiny_gpt(bpe.vocab_size)
    from gptn.model import GPT
    post = GPT(post.config.replace(norm="post"))
    save_checkpoint(tmp_path / "post", post.config, post.state_dict(), tokenizer=bpe)
    normalised = train_bpe([TEXT * 5], 300).with_normalization(("lower",))
    save_checkpoint(tmp_path / "norm", post.config.replace(norm="pre"), tiny_gpt(bpe.vocab_size).state_dict(),
                    tokenizer=normalised)
    (tmp_path / "taken.gguf").write_bytes(b"mine")
    cases = {
        (str(tmp_path / "char"), "c.gguf"): "character",
        (str(tmp_path / "post"), "p.gguf"): "post-LN",
        (str(tmp_path / "norm"), "n.gguf"): "normalises",
        (str(run), "taken.gguf"): "already exists",
        (str(run), "nofolder/x.gguf"): "does not exist",
        (str(tmp_path / "nosuch"), "x.gguf"): "does not exist",
    }
    for (src, out), words in cases.items():
        assert main(["export-gguf", src, str(tmp_path / out)]) == 2, (src, out)
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and words in err and "Traceback" not in err, err
    assert (tmp_path / "taken.gguf").read_bytes() == b"mine"
    assert sorted(p.name for p in tmp_path.glob("*.gguf")) == ["taken.gguf"]
