import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gptn.config import GptnError
from gptn.tokenizer import (DELIM, EOT, EXTRACT, GPT1_SPECIALS, START, CharTokenizer, load_tokenizer,
                            resolve_tokenizer, train_bpe)

SAMPLE = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak. Ünïcødé ✓ 日本語 🙂\n"


@pytest.fixture(scope="module")
def gpt2():
    from conftest import require_shared
    return load_tokenizer(require_shared() / "gpt2-bpe")


@pytest.fixture(scope="module")
def trained():
    texts = [SAMPLE * 3, "def f(x):\n    return x + 1\n" * 20, "the quick brown fox jumps over the lazy dog " * 50,
             " ".join(f"word{i} token{i * 7} {chr(0x3b1 + i % 20)}" for i in range(3000))]
    return train_bpe(texts, 400)


def test_gpt2_matches_tiktoken_on_tiny_shakespeare(gpt2, shared_data):
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from gptn.tokenizer import GPT2_PATTERN
    ranks = data_gym_to_mergeable_bpe_ranks(str(shared_data / "gpt2-bpe" / "vocab.bpe"),
                                            str(shared_data / "gpt2-bpe" / "encoder.json"))
    ref = tiktoken.Encoding("gpt2-files", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={EOT: 50256})
    text = (shared_data / "tinyshakespeare" / "input.txt").read_text()
    ids = gpt2.encode(text)
    assert ids == ref.encode_ordinary(text)
    assert gpt2.vocab_size == 50257 and gpt2.eot_id == 50256
    assert gpt2.decode(ids) == text


def test_gpt2_hf_layout_loads_the_same(gpt2, tmp_path):
    gpt2.save(tmp_path / "tok")  # writes vocab.json + merges.txt
    again = load_tokenizer(tmp_path / "tok")
    assert again.encode(SAMPLE) == gpt2.encode(SAMPLE)
    from tokenizers import Tokenizer as HF, models, pre_tokenizers
    hf = HF(models.BPE.from_file(str(tmp_path / "tok" / "vocab.json"), str(tmp_path / "tok" / "merges.txt")))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    assert hf.encode(SAMPLE).ids == gpt2.encode(SAMPLE)


def test_trained_bpe_has_requested_size_and_matches_hf_tokenizers(trained):
    assert trained.vocab_size == 400
    hf = trained._build_hf()
    for text in (SAMPLE, "brown dogs return x", "unseen ✓ words"):
        assert trained.encode(text) == hf.encode(text).ids


def test_char_tokenizer():
    tok = CharTokenizer.from_text("hello world")
    assert tok.vocab_size == len(set("hello world")) + 1
    assert tok.decode(tok.encode("hello")) == "hello"
    with pytest.raises(GptnError, match="not in this character"):
        tok.encode("xyz")


@pytest.mark.parametrize("make", ["char", "bpe"])
def test_gpt1_special_tokens_added_and_parsed(make, trained):
    tok = CharTokenizer.from_text(SAMPLE) if make == "char" else train_bpe([SAMPLE], 300)
    base = tok.vocab_size
    tok.add_special_tokens()
    assert [tok.special_tokens[s] for s in GPT1_SPECIALS] == [base, base + 1, base + 2]
    assert tok.vocab_size == base + 3
    ids = tok.encode(f"{START}Speak{DELIM}hear{EXTRACT}", allow_special=True)
    assert ids[0] == tok.special_tokens[START] and ids[-1] == tok.special_tokens[EXTRACT]
    assert tok.special_tokens[DELIM] in ids
    assert tok.decode(ids) == f"{START}Speak{DELIM}hear{EXTRACT}"
    # Without allow_special the same string is ordinary text.
    if make == "bpe":
        assert tok.special_tokens[START] not in tok.encode(START)


@pytest.mark.parametrize("make", ["char", "bpe"])
def test_save_and_reload(make, trained, tmp_path):
    tok = CharTokenizer.from_text(SAMPLE) if make == "char" else trained
    tok.add_special_tokens()
    tok.save(tmp_path / "t")
    again = load_tokenizer(tmp_path / "t")
    assert again.encode(SAMPLE) == tok.encode(SAMPLE)
    assert again.special_tokens == tok.special_tokens and again.vocab_size == tok.vocab_size


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_round_trip_any_unicode_trained_bpe(trained, text):
    assert trained.decode(trained.encode(text)) == text


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_round_trip_any_unicode_gpt2(gpt2, text):
    assert gpt2.decode(gpt2.encode(text)) == text


@settings(max_examples=100, deadline=None)
@given(st.text(alphabet=st.sampled_from(sorted(set(SAMPLE)))))
def test_round_trip_char(text):
    tok = CharTokenizer.from_text(SAMPLE)
    assert tok.decode(tok.encode(text)) == text


def test_resolve_errors():
    with pytest.raises(GptnError, match="bpe:N"):
        resolve_tokenizer("bpe:many", ["x"])
    with pytest.raises(GptnError, match="at least 257"):
        resolve_tokenizer("bpe:100", ["x"])
    with pytest.raises(GptnError, match="expected char"):
        resolve_tokenizer("/no/such/tokenizer")


def test_hugging_face_tokenizer_json_loads(trained, tmp_path):
    hf = trained._build_hf()
    (tmp_path / "hfdir").mkdir()
    hf.save(str(tmp_path / "hfdir" / "tokenizer.json"))
    tok = load_tokenizer(tmp_path / "hfdir")
    assert tok.encode(SAMPLE) == trained.encode(SAMPLE)
    assert tok.decode(tok.encode(SAMPLE)) == SAMPLE
