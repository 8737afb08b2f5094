"""benchmarks/gpu.py --smoke: every step the GPU run takes (correctness, speed, the transfer tier) on the
CPU with tiny shapes, so that the script is known to work before a GPU is available."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_gpu_script_runs_every_step_in_smoke_mode(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import gpu
    from conftest import require_shared
    require_shared()  # the transfer tier reads IMDB and SST-2
    out = tmp_path / "gpu.json"
    # Every step but gpt2-medium: in smoke mode the same tiny shape and function as gpt2.
    steps = [name for _, name, _, _ in gpu.STEPS if name != "gpt2-medium"]
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--smoke", "--out", str(out),
                        "--only", ",".join(steps)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["smoke"] is True
    for name in ("train_step", "finetune_autocast", "decode_dtypes", "serve", "fsdp"):
        step = results["correctness"][name]
        assert step.get("passed") is True, (name, step)
    speed = results["speed"]["gpt2"]
    assert speed["mfu"] > 0 and speed["speed_ratio_vs_hf_gpu"] > 0 and "error" not in speed, speed
    levers = results["speed"]["levers"]
    assert all("tokens_per_s" in v for k, v in levers.items() if k not in ("passed", "seconds")), levers
    transfer = results["transfer"]["sst2"]
    assert "pretrained_minus_bow" in transfer and len(transfer["pretrained_minus_bow_ci95"]) == 2, transfer
    assert "correctness: train_step" in p.stdout and "wrote" in p.stdout  # the summary
