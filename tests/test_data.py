import json

import numpy as np
import pytest

from gptn.cli import main
from gptn.config import GptnError
from gptn.data import (BatchLoader, Corpus, prepare, read_shard, split_for_tokenizing, write_shard)
from gptn.tokenizer import CharTokenizer, train_bpe


def _corpus_files(folder, n=30):
    folder.mkdir()
    for i in range(n):
        (folder / f"doc{i:02d}.txt").write_text(f"Document {i}.\n" + "the cat sat on the mat. " * (20 + i) + "\n")
    return folder


@pytest.fixture(scope="module")
def bpe():
    return train_bpe(["the cat sat on the mat. Document 0123456789.\n" * 50], 300)


@pytest.mark.parametrize("dtype", [np.uint16, np.uint32])
def test_shard_round_trip(tmp_path, dtype):
    tokens = np.arange(0, 70000, 7, dtype=np.int64) % (2**16 if dtype == np.uint16 else 2**32)
    write_shard(tmp_path / "s.tok", tokens.astype(dtype))
    back = read_shard(tmp_path / "s.tok")
    assert back.dtype == dtype
    np.testing.assert_array_equal(back, tokens)


def test_corrupt_shards_are_refused(tmp_path):
    write_shard(tmp_path / "s.tok", np.arange(100, dtype=np.uint16))
    data = (tmp_path / "s.tok").read_bytes()
    (tmp_path / "short.tok").write_bytes(data[:-10])
    with pytest.raises(GptnError, match="truncated"):
        read_shard(tmp_path / "short.tok")
    (tmp_path / "magic.tok").write_bytes(b"X" + data[1:])
    with pytest.raises(GptnError, match="bad magic"):
        read_shard(tmp_path / "magic.tok")


def test_prepare_writes_manifest_and_split_is_deterministic(tmp_path, bpe):
    src = _corpus_files(tmp_path / "src")
    m1 = prepare([str(src)], bpe, tmp_path / "a", val_fraction=0.2, workers=2, progress=False)
    m2 = prepare([str(src)], bpe, tmp_path / "b", val_fraction=0.2, workers=1, progress=False)
    assert m1["documents"] == m2["documents"] and m1["tokens"] == m2["tokens"]
    assert m1["documents"]["train"] + m1["documents"]["val"] == 30 and m1["documents"]["val"] > 0
    assert m1["dtype"] == "uint16" and m1["split_by"] == "document"
    for split in ("train", "val"):
        for name in m1["shards"][split]:
            assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    corpus = Corpus(tmp_path / "a")
    tokens = np.concatenate(corpus.shards("train"))
    assert tokens.size == m1["tokens"]["train"]
    eot = corpus.tokenizer.eot_id
    docs = corpus.tokenizer.decode(tokens.tolist()).split("<|endoftext|>")
    assert (tokens == eot).sum() == m1["documents"]["train"] and docs[-1] == ""
    assert all(d.startswith("Document ") for d in docs[:-1])
    assert sum(len(d.encode()) for d in docs) == m1["bytes"]["train"]


def test_one_file_corpus_holds_out_its_tail(tmp_path):
    text = "".join(f"line {i} of a single long document\n" for i in range(1000))
    (tmp_path / "one.txt").write_text(text)
    m = prepare([str(tmp_path / "one.txt")], "char", tmp_path / "c", val_fraction=0.1, progress=False)
    assert m["split_by"] == "document tail"
    corpus = Corpus(tmp_path / "c")
    val = corpus.tokenizer.decode(np.concatenate(corpus.shards("val")).tolist())
    train = corpus.tokenizer.decode(np.concatenate(corpus.shards("train")).tolist())
    assert train.replace("<|endoftext|>", "") + val.replace("<|endoftext|>", "") == text
    assert 0.08 < len(val) / len(text) < 0.12


def test_long_documents_tokenize_in_pieces_exactly(shared_data, bpe):
    from gptn.tokenizer import load_tokenizer
    tok = load_tokenizer(shared_data / "gpt2-bpe")
    text = (shared_data / "tinyshakespeare" / "input.txt").read_text()[:300_000]
    pieces = split_for_tokenizing(text, chunk_chars=20_000)
    assert len(pieces) > 10 and "".join(pieces) == text
    assert sum((tok.encode(p) for p in pieces), []) == tok.encode(text)


def test_jsonl_source_and_text_field(tmp_path):
    rows = [{"body": f"record number {i} " * 5} for i in range(25)]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    m = prepare([str(tmp_path / "d.jsonl")], "char", tmp_path / "c", text_field="body", progress=False)
    assert m["documents"]["train"] + m["documents"]["val"] == 25
    with pytest.raises(GptnError, match="no field 'text'"):
        prepare([str(tmp_path / "d.jsonl")], "char", tmp_path / "c2", progress=False)
    assert not (tmp_path / "c2").exists() and not list(tmp_path.glob(".c2.tmp*"))


def test_loader_is_a_function_of_seed_and_step(tmp_path, bpe):
    src = _corpus_files(tmp_path / "src")
    prepare([str(src)], bpe, tmp_path / "c", progress=False)
    corpus = Corpus(tmp_path / "c")
    a = BatchLoader(corpus, "train", n_ctx=16, global_batch=8, seed=3)
    b = BatchLoader(Corpus(tmp_path / "c"), "train", n_ctx=16, global_batch=8, seed=3)
    first = [x for x, _ in a.step_batches(5)]
    for step in (9, 2, 5):  # any order: the batch depends on (seed, step) only
        got = [x for x, _ in b.step_batches(step)]
    assert all((f == g).all() for f, g in zip(first, got))
    assert not (next(a.step_batches(6))[0] == first[0]).all()
    x, y = next(a.step_batches(0))
    assert x.shape == (8, 16) and (x[:, 1:] == y[:, :-1]).all()
    # Two ranks with two accumulation steps each see exactly the single rank's global batch.
    whole = next(a.step_batches(7))[0]
    parts = [x for r in range(2) for x, _ in
             BatchLoader(corpus, "train", 16, 8, seed=3, rank=r, world=2, accum=2).step_batches(7)]
    assert all(p.shape == (2, 16) for p in parts)
    assert (np.concatenate(parts) == whole.numpy()).all()
    with pytest.raises(GptnError, match="not divisible"):
        BatchLoader(corpus, "train", 16, 6, world=4)


def test_bad_input_errors(tmp_path, capsys):
    assert main(["prepare", str(tmp_path / "missing.txt"), "--tokenizer", "char", "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "e.txt").write_text("")
    assert main(["prepare", str(tmp_path / "empty"), "--tokenizer", "char", "--out", str(tmp_path / "o")]) == 2
    assert "corpus is empty" in capsys.readouterr().err
    (tmp_path / "nothing").mkdir()
    assert main(["prepare", str(tmp_path / "nothing"), "--tokenizer", "char", "--out", str(tmp_path / "o")]) == 2
    assert "is a folder with no files in it" in capsys.readouterr().err
    (tmp_path / "bin.dat").write_bytes(b"\x00\x01\x02binary")
    assert main(["prepare", str(tmp_path / "bin.dat"), "--tokenizer", "char", "--out", str(tmp_path / "o")]) == 2
    assert "binary file" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_invalid_utf8_in_folder_is_skipped_with_offset(tmp_path, capsys):
    src = _corpus_files(tmp_path / "src")
    (src / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    m = prepare([str(src)], "char", tmp_path / "c", progress=False)
    err = capsys.readouterr().err
    assert "latin1.txt" in err and "byte offset 3" in err
    assert m["documents"]["train"] + m["documents"]["val"] == 30


def test_files_without_text_in_a_folder_are_skipped_with_one_warning_each(tmp_path, capsys):
    src = _corpus_files(tmp_path / "src")
    (src / "image.bin").write_bytes(b"\x89PNG\x00\x00")
    (src / "labels.jsonl").write_text('{"label": 1}\n{"label": 0}\n')  # no "text" field: not a corpus file
    m = prepare([str(src)], "char", tmp_path / "c", progress=False)  # two passes: the tokenizer, then shards
    err = capsys.readouterr().err
    assert err.count("skipping binary file") == 1 and err.count("labels.jsonl:1: no field 'text'") == 1
    assert m["documents"]["train"] + m["documents"]["val"] == 30
    # Named explicitly, the same file is a mistake, not something to skip.
    assert main(["prepare", str(src / "labels.jsonl"), "--tokenizer", "char", "--out", str(tmp_path / "o")]) == 2
    assert "no field 'text'" in capsys.readouterr().err


def test_vocabulary_too_large_for_uint16(tmp_path, shared_data):
    src = _corpus_files(tmp_path / "src")
    corpus_chars = set("".join(p.read_text() for p in src.iterdir()))
    tok = CharTokenizer(sorted(corpus_chars) + [chr(0x20000 + i) for i in range(70000)])
    with pytest.raises(GptnError, match="does not fit in uint16"):
        prepare([str(src)], tok, tmp_path / "c", dtype="uint16", progress=False)
    m = prepare([str(src)], tok, tmp_path / "c", progress=False)
    assert m["dtype"] == "uint32"
    assert read_shard(tmp_path / "c" / m["shards"]["train"][0]).dtype == np.uint32


def test_output_folder_holding_a_corpus_is_refused(tmp_path, capsys):
    src = _corpus_files(tmp_path / "src")
    args = ["prepare", str(src), "--tokenizer", "char", "--out", str(tmp_path / "c")]
    assert main(args) == 0
    before = (tmp_path / "c" / "manifest.json").read_text()
    capsys.readouterr()
    assert main(args) == 2
    assert "already holds a prepared corpus" in capsys.readouterr().err
    assert (tmp_path / "c" / "manifest.json").read_text() == before


def test_parquet_source(tmp_path):
    pa = pytest.importorskip("pyarrow", reason="the parquet extra (pyarrow) is not installed")
    import pyarrow.parquet as pq
    table = pa.table({"content": [f"parquet row {i} " * 4 for i in range(30)], "id": list(range(30))})
    pq.write_table(table, tmp_path / "d.parquet")
    m = prepare([str(tmp_path / "d.parquet")], "char", tmp_path / "c", text_field="content", progress=False)
    assert m["documents"]["train"] + m["documents"]["val"] == 30
    with pytest.raises(GptnError, match="no column 'text'"):
        prepare([str(tmp_path / "d.parquet")], "char", tmp_path / "c2", progress=False)


def test_a_piped_prepare_prints_plain_lines(tmp_path):
    import subprocess
    import sys
    (tmp_path / "t.txt").write_text("some text to tokenize. " * 500)
    p = subprocess.run([sys.executable, "-m", "gptn", "prepare", str(tmp_path / "t.txt"), "--tokenizer", "char",
                        "--out", str(tmp_path / "c")], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert "\r" not in p.stderr and p.stderr.startswith("tokenizing: ") and " MB/s)" in p.stderr
