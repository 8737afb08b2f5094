import os
import threading
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TIKTOKEN_CACHE_DIR", "")
torch.set_num_threads(min(2, os.cpu_count() or 1))

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def require_shared() -> Path:
    """../shared/data beside the project; in CI it must be there, elsewhere its absence skips."""
    if not SHARED.is_dir():
        if os.environ.get("CI"):
            raise RuntimeError(f"{SHARED} is missing in CI")
        pytest.skip(f"{SHARED} is absent on this machine (the shared datasets folder)")
    return SHARED


@pytest.fixture
def shared_data() -> Path:
    return require_shared()


def lm_eval_mc_task(name: str, train, test, metrics=("acc",)) -> str:
    """An lm-evaluation-harness task YAML: multiple choice over JSON lines of {question, choices, label}.
    Data files are absolute: lm-eval resolves relative ones against the current directory."""
    metric_list = "".join(f"  - metric: {m}\n    aggregation: mean\n    higher_is_better: true\n" for m in metrics)
    return f"""task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    train: {train}
    test: {test}
output_type: multiple_choice
training_split: train
test_split: test
fewshot_split: train
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
{metric_list}"""


def tiny_gpt(vocab_size: int, n_ctx: int = 48, sharpen: bool = False):
    """A 2-layer, d_model 32 GPT with seeded random weights, in eval mode. `sharpen` scales W_e by 3
    for peakier distributions than at initialisation, so that greedy decoding is well defined."""
    from gptn.config import GPTConfig
    from gptn.model import GPT
    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=vocab_size, n_ctx=n_ctx, n_layer=2, n_head=2, d_model=32, dropout=0.0))
    if sharpen:
        with torch.no_grad():
            m.wte.weight.mul_(3)
    return m.eval()


@pytest.fixture(scope="module")
def tok():
    """A character tokenizer over lower-case text (modules with other alphabets define their own)."""
    from gptn.tokenizer import CharTokenizer
    return CharTokenizer.from_text("abcdefghijklmnopqrstuvwxyz ,.\n")


@pytest.fixture(scope="module")
def model(tok):
    """tiny_gpt over `tok`, sharpened so that greedy decoding is well defined."""
    return tiny_gpt(tok.vocab_size, n_ctx=48, sharpen=True)


def _gptn(args, ranks: int = 1) -> dict:
    """How a test starts `gptn ARGS` in a subprocess: one thread a process (under torchrun with `ranks` CPU
    processes); keyword arguments for subprocess.run / Popen."""
    import sys
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"] if ranks > 1 else []
    return {"args": [sys.executable, *launcher, "-m", "gptn", *args], "env": {**os.environ, "OMP_NUM_THREADS": "1"}}


def gptn_cli(*args: str, ranks: int = 1, timeout: float = 300):
    """`gptn ARGS` in a subprocess (see _gptn), its output captured."""
    import subprocess
    return subprocess.run(**_gptn(args, ranks), capture_output=True, text=True, timeout=timeout)


def kill_after_checkpoint(argv: list[str], meta: Path, min_step: int, timeout: float = 120) -> int:
    """Run `gptn ARGV...` and SIGKILL it once `meta` (a checkpoint's meta.json) is past `min_step`
    (min_step 0: once it exists); the step of the checkpoint the kill left."""
    import json
    import signal
    import subprocess
    import time
    proc = subprocess.Popen(**_gptn(argv), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        try:
            if json.loads(meta.read_text())["step"] >= min_step:
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return json.loads(meta.read_text())["step"]


def build_runs(root: Path, tokenizer: str = "char") -> Path:
    """In `root`: a corpus `c` of one small text, a 3-step pretraining run `pre` (context 32), a
    fine-tuned run `ft` of it (t.tsv, one epoch) and a Hugging Face GPT-2 folder `hf` (no tokenizer)."""
    from gptn.cli import main
    from gptn.data import prepare
    from gptn.pretrain import PretrainConfig, pretrain
    (root / "t.txt").write_text("the quick brown fox jumps over the lazy dog. " * 300)
    prepare([str(root / "t.txt")], tokenizer, root / "c", val_fraction=0.1, progress=False)
    pretrain(PretrainConfig(corpus=str(root / "c"), out=str(root / "pre"), preset="tiny", overrides={"n_ctx": 32},
                            steps=3, batch_tokens=128, eval_interval=0, progress=False))
    (root / "t.tsv").write_text("sentence\tlabel\n" + "".join(f"the {w} dog\t{i % 2}\n" for i, w in
                                                             enumerate(["quick", "lazy"] * 4)))
    assert main(["finetune", str(root / "pre"), "--train", str(root / "t.tsv"), "--out", str(root / "ft"),
                 "--epochs", "1", "--no-progress"]) == 0
    hf = pytest.importorskip("transformers")
    model = hf.GPT2LMHeadModel(hf.GPT2Config(vocab_size=500, n_positions=16, n_embd=64, n_layer=1, n_head=2))  # > 96 KiB
    model.save_pretrained(root / "hf")
    return root


def hold(engine):
    """Block the engine thread until the returned event is set, so that several jobs arrive together.
    Returns once the engine is inside the blocking call: what is put in its inbox from then on stays there
    (before that, the engine may still be draining the inbox into its own queues)."""
    from gptn.engine import _Call

    release, held = threading.Event(), threading.Event()
    engine.inbox.put(_Call(lambda: (held.set(), release.wait(30)), threading.Event()))
    assert held.wait(30), "the engine thread never ran the blocking call"
    return release


def together(*calls):
    """Run zero-argument callables at once, one thread each, and return their results in order. For tests
    that start several small runs: most of such a run is its own start-up (importing torch), on one core."""
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(len(calls)) as pool:
        return [f.result() for f in [pool.submit(c) for c in calls]]
