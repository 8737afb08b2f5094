import re
from pathlib import Path

import pytest

from conftest import lm_eval_mc_task

ROOT = Path(__file__).resolve().parents[1]


def _quick_start_commands():
    text = (ROOT / "README.md").read_text()
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    return [ln for b in blocks for ln in b.splitlines() if ln and not ln.startswith("#")]


def test_readme_has_exactly_two_setup_commands_and_ci_runs_the_test_one():
    commands = _quick_start_commands()
    assert len(commands) == 2
    main_cmd, test_cmd = commands
    assert main_cmd.endswith("gptn quickstart")
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_cmd in ci  # verbatim


def _blocks(doc: str = "README.md"):
    """(language, line, text) of every fenced block in a document."""
    text = (ROOT / doc).read_text()
    return [(m.group(1), text[:m.start()].count("\n") + 1, m.group(2))
            for m in re.finditer(r"```(\w*)\n(.*?)```", text, flags=re.S)]


# Blocks the walkthrough does not run, and why. Everything else runs, in README order, on a tiny budget.
NOT_RUN = {
    "pip install torch": "the set-up commands: CI runs the test one, and this test runs under it",
    "gptn sizes [--json]": "the command synopsis (placeholders, not a command)",
    "torchrun": "several processes per GPU: the DDP / FSDP tests run it on CPU with gloo",
    '{"name": "capitals"': "a task file's format, not a command",
}
# The README's budgets, cut to seconds (one already smaller stays): same commands, flags and code otherwise.
TINY = [(r"(--steps |\bsteps=)(\d+)", 4), (r"(--max-new-tokens |max_new_tokens=)(\d+)", 8), (r"(max_tokens=)(\d+)", 4),
        (r"(--max-train-examples )(\d+)", 48), (r"(--minutes )([\d.]+)", 0.05), (r"(--max-seconds )(\d+)", 2),
        (r"(--limit )(\d+)", 4)]
# A pretraining's own budget beyond its steps: validation batches and tokens per step.
PRETRAIN_TINY = {"eval_batches": 2, "batch_tokens": 1024}


def _tiny(command: str, shared: str) -> str:
    """`command` (a line of bash or a block of Python) on the tiny budget."""
    for pattern, most in TINY:
        command = re.sub(pattern, lambda m: f"{m.group(1)}{min(float(m.group(2)), most):g}", command)
    if command.startswith("gptn pretrain"):
        command += "" if "--steps" in command else " --steps 4"
        command += "".join(f" --{k.replace('_', '-')} {v}" for k, v in PRETRAIN_TINY.items()
                           if f"--{k.replace('_', '-')}" not in command)
    command = re.sub(r"PretrainConfig\(", "PretrainConfig(" + "".join(f"{k}={v}, " for k, v in PRETRAIN_TINY.items()),
                     command)
    if command.startswith("gptn finetune"):
        command += " --epochs 1"
    # IMDB's 132 MB and Gutenberg's 75 MB: a sample of each, same formats
    return (command.replace("../shared/data/imdb/", "imdb-sample/").replace("../shared/data/gutenberg", "books-sample")
            .replace("../shared/data", shared))


def _walkthrough_inputs(work, shared):
    """The files the README's examples name without shipping: samples of the big corpora, SST-2 subsets,
    an lm-eval task folder."""
    import itertools
    import json
    (work / "imdb-sample").mkdir()
    for name in ("unsup.jsonl", "train.jsonl"):
        with open(shared / "imdb" / name) as f:
            (work / "imdb-sample" / name).write_text("".join(itertools.islice(f, 200)))
    (work / "books-sample").mkdir()
    with open(shared / "gutenberg" / "books-00.jsonl") as f:
        books = [json.loads(line) for line in itertools.islice(f, 2)]
    (work / "books-sample" / "books-00.jsonl").write_text(
        "".join(json.dumps({**b, "text": b["text"][:100_000]}) + "\n" for b in books))
    sst = (shared / "glue" / "SST-2" / "train.tsv").read_text().splitlines()
    (work / "sst2_2000.tsv").write_text("\n".join(sst[:49]) + "\n")
    (work / "sst2_select.tsv").write_text("\n".join(sst[:1] + sst[49:73]) + "\n")
    (work / "my_tasks").mkdir()
    rows = [{"question": f"which is {w}?", "choices": ["cat", "dog", w], "label": 2} for w in ("sun", "moon", "tree")]
    (work / "items.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (work / "my_tasks" / "task.yaml").write_text(
        lm_eval_mc_task("my_local_task", work / "items.jsonl", work / "items.jsonl"))



@pytest.fixture(scope="module")
def walks(tmp_path_factory):
    """Both walkthroughs, started together: most of their commands' time is a one-core start-up."""
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(2) as pool:
        yield {doc: pool.submit(_walk, doc, tmp_path_factory.mktemp("walk")) for doc in ("README.md", "docs/lecture.md")}


def test_every_readme_example_runs_on_a_tiny_budget(walks):
    ran = walks["README.md"].result()
    assert len(ran) >= 7, ran  # Shakespeare, Python API, fine-tuning, continued pretraining, lm-eval x2, serving x2


def test_every_command_of_the_lecture_walkthrough_runs_on_a_tiny_budget(walks):
    ran = walks["docs/lecture.md"].result()
    assert len(ran) >= 10, ran


def _walk(doc: str, tmp_path) -> list[int]:
    """Run every block of `doc` in order, on a tiny budget, in one working folder; the lines that ran."""
    import os
    import shutil
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    from conftest import require_shared
    pytest.importorskip("lm_eval", reason="the walkthrough runs the lm-eval example (dev extra)")
    pytest.importorskip("openai", reason="the walkthrough runs the openai client example (dev extra)")
    shared = require_shared()
    work = tmp_path / "work"
    work.mkdir()
    _walkthrough_inputs(work, shared)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    gptn = shutil.which("gptn") or f"{sys.executable} -m gptn"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    server = None
    ran = []
    try:
        for lang, line, text in _blocks(doc):
            if lang not in ("bash", "python") or any(text.lstrip().startswith(k) or k in text for k in NOT_RUN):
                continue
            if lang == "python":
                code = _tiny(text.replace("127.0.0.1:8000", f"127.0.0.1:{port}"), str(shared))
                out = subprocess.run([sys.executable, "-c", code], cwd=work, env=env, capture_output=True, text=True,
                                     timeout=600)
                assert out.returncode == 0, f"{doc} line {line}:\n{code}\n{out.stderr[-2000:]}"
                ran.append(line)
                continue
            commands = [c.strip() for c in re.sub(r"\\\n\s*", " ", text).splitlines()]
            for command in (c.split("  #", 1)[0].strip() for c in commands if c and not c.startswith("#")):
                if command.startswith("pip install"):
                    continue  # the extras are installed: this test runs under `.[dev]`
                command = _tiny(command, str(shared))
                if command.startswith("gptn serve"):
                    command = command.replace("--port 8000", f"--port {port}")
                    server = subprocess.Popen(command.replace("gptn", gptn, 1), shell=True, cwd=work, env=env,
                                              start_new_session=True)
                    for _ in range(300):
                        try:
                            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
                            break
                        except OSError:
                            time.sleep(0.2)
                    continue
                out = subprocess.run(command.replace("gptn", gptn, 1), shell=True, cwd=work, env=env,
                                     capture_output=True, text=True, timeout=600)
                assert out.returncode == 0, f"{doc} line {line}: {command}\n{out.stderr[-2000:]}"
            ran.append(line)
    finally:
        if server is not None:
            os.killpg(server.pid, 15)
            server.wait(timeout=30)
    return ran
