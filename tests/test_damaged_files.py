"""Every file a run, a fine-tuned run, a corpus and a Hugging Face folder hold, damaged every way a file
gets damaged (cut short, emptied, not UTF-8, JSON of the wrong type, a key missing), under every command
that reads that kind of folder: the command answers in one line naming the damaged file and exits 2, or
does its work (a file it does not read) — never a traceback. The cases are generated from the folders'
own files, not listed by hand, so a file added later is damaged too."""

import json
import shutil

import pytest

from conftest import build_runs

from gptn.cli import main


def _damages(path):
    """name -> the damaged bytes of `path`."""
    data = path.read_bytes()
    out = {"cut short": data[:len(data) // 2], "empty": b"", "not UTF-8": b"\xff\xfe\x00" + data[3:]}
    try:
        value = json.loads(data)
    except ValueError:
        return out
    out["JSON of the wrong type"] = b"[]" if isinstance(value, dict) else b"{}"
    if isinstance(value, dict) and value:
        out["a key missing"] = json.dumps({k: v for k, v in list(value.items())[1:]}).encode()
    return out


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = build_runs(tmp_path_factory.mktemp("damaged"), "bpe:300")
    assert main(["export-hf", str(root / "pre"), str(root / "hf-tok")]) == 0  # tokenizer files of an HF folder
    for f in (root / "hf-tok").iterdir():
        if "token" in f.name or f.name in ("vocab.json", "merges.txt"):
            shutil.copy(f, root / "hf" / f.name)
    return root


# Each folder kind, and the commands that read it (OUT: a new output path per case).
COMMANDS = {  # conftest.build_runs's folders: pre (a pretraining run), ft (fine-tuned), c (corpus), hf
    "pre": [["generate", "{pre}", "--prompt", "the", "--max-new-tokens", "2"],
            ["pretrain", "{c}", "--out", "{pre}", "--steps", "4", "--eval-interval", "0", "--no-progress"],
            ["export-hf", "{pre}", "{out}"]],
    "ft": [["predict", "{ft}", "--text", "the quick dog"], ["export-hf", "{ft}", "{out}"]],
    "c": [["pretrain", "{c}", "--out", "{out}", "--preset", "tiny", "--set", "n_ctx=32", "--steps", "1",
           "--batch-tokens", "128", "--eval-interval", "0", "--no-progress"]],
    "hf": [["import-hf", "{hf}", "{out}"]],
}


@pytest.mark.parametrize("kind", sorted(COMMANDS))
def test_every_damaged_file_is_one_line_naming_it(folders, kind, capsys):
    files = sorted(p for p in (folders / kind).rglob("*") if p.is_file() and p.name != ".lock"
                   and p.suffix not in (".png",))
    assert files
    failures, n = [], 0
    for path in files:
        original = path.read_bytes()
        for damage, data in _damages(path).items():
            for k, command in enumerate(COMMANDS[kind]):
                out = folders / f"out-{n}"
                n += 1
                argv = [a.format(out=out, **{x: folders / x for x in COMMANDS}) for a in command]
                path.write_bytes(data)
                try:
                    rc = main(argv)
                except SystemExit as e:  # argparse
                    rc = e.code
                except BaseException as e:  # noqa: BLE001 - a traceback is the failure this test looks for
                    rc = f"raised {type(e).__name__}: {e}"
                finally:
                    path.write_bytes(original)
                    shutil.rmtree(out, ignore_errors=True)
                err = capsys.readouterr().err.strip()
                named = path.name in err or str(path.parent) in err
                if rc == 2 and len(err.splitlines()) == 1 and named and "Traceback" not in err:
                    continue
                if rc == 0 and "Traceback" not in err:
                    continue  # a file this command does not read (or a damage it does not see)
                failures.append(f"{path.relative_to(folders)} {damage}: `{' '.join(command[:1])}` -> {rc}: "
                                f"{err.splitlines()[-1] if err else ''}")
    assert not failures, f"{len(failures)} of {n} cases:\n" + "\n".join(failures)


def test_identical_checkpoints_are_identical_bytes(tmp_path):
    """Two processes saving the same weights write the same bytes (the safetensors metadata map is
    written in hash order, which differs per process: one key keeps it fixed), so checksums compare runs."""
    import hashlib
    import subprocess
    import sys
    script = ("import sys, torch; from gptn.checkpoint import save_checkpoint; from gptn.config import GPTConfig;"
              "from gptn.model import GPT; torch.manual_seed(0); c = GPTConfig(vocab_size=64, n_ctx=8, n_layer=1,"
              "n_head=1, d_model=8); save_checkpoint(sys.argv[1], c, GPT(c).state_dict(),"
              "extra_tensors={'head.safetensors': {'w': torch.ones(2)}})")
    digests = []
    for name in ("a", "b"):
        subprocess.run([sys.executable, "-c", script, str(tmp_path / name)], check=True)
        digests.append({f.name: hashlib.sha256(f.read_bytes()).hexdigest()
                        for f in sorted((tmp_path / name / "checkpoint").iterdir())})
    assert digests[0] == digests[1]
