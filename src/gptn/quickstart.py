"""`gptn quickstart`: the whole pipeline on a CPU in a few minutes, with no download.

prepare (the Python standard library's sources, a BPE trained on them) -> pretrain a small
GPT-2-style model for a fixed time budget -> loss curve -> samples -> next-token probabilities.
"""

from __future__ import annotations

import time
from pathlib import Path

from .checkpoint import has_checkpoint, load_model
from .compute import parameter_count
from .config import GPTConfig, GptnError, is_number
from .data import STDLIB, Corpus, prepare
from .generate import generate, next_token_probs
from .sampling import SamplingConfig
from .pretrain import PretrainConfig, pretrain

# A GPT-2-style (pre-LN) model small enough to learn something in minutes on two cores.
QUICKSTART_MODEL = dict(n_layer=4, n_head=4, d_model=256, n_ctx=128, dropout=0.0)
BATCH_SEQUENCES = 16


def quickstart(out: str | Path = "runs/quickstart", sources: list[str] | None = None, minutes: float = 4.0,
               vocab: int = 4096, prompt: str | None = None, progress: bool = True, say=print) -> dict:
    """Run the pipeline; returns paths and figures. Re-running reuses the prepared corpus."""
    if not is_number(minutes) or minutes <= 0:  # checked before anything is written or removed
        raise GptnError(f"--minutes must be a positive number, got {minutes}")
    out = Path(out)
    corpus_dir, run_dir = out / "corpus", out / "run"
    sources = sources or [STDLIB]
    # The embedded corpus is Python source; any other is taken to be prose, sampled after the prompt.
    sample_prompts = ["def ", "import ", "class "] if sources == [STDLIB] else [prompt or "It was"]
    prompt = prompt or ("for i in" if sources == [STDLIB] else "After running I am")
    t_start = time.perf_counter()
    if (corpus_dir / "manifest.json").exists():
        say(f"[1/4] reusing the prepared corpus in {corpus_dir}")
    else:
        say(f"[1/4] preparing the corpus: {'the Python standard library sources' if sources == [STDLIB] else sources}, "
            f"byte-level BPE of {vocab} tokens trained on it")
        # 2% of the ~600 files: enough held-out documents for a stable validation loss.
        prepare(sources, f"bpe:{vocab}", corpus_dir, val_fraction=0.02, progress=progress)
    corpus = Corpus(corpus_dir)
    m = corpus.manifest
    say(f"      {m['documents']['train']:,} training documents, {m['tokens']['train']:,} tokens")

    if has_checkpoint(run_dir):
        import shutil
        shutil.rmtree(run_dir)  # a quickstart always trains afresh within its budget
    config = GPTConfig(vocab_size=corpus.tokenizer.vocab_size, **QUICKSTART_MODEL)
    # Muon: its steps cost ~35% more here, but in two minutes it reached validation loss 5.04 where AdamW
    # was at 5.55. The time budget sizes the schedule: the cosine decays over the minutes given.
    say(f"[2/4] pretraining a GPT-2-style model ({parameter_count(config):,} parameters: "
        f"{config.n_layer} layers, d_model {config.d_model}, {config.n_head} heads, context {config.n_ctx}) "
        f"with Muon for {minutes:g} min")
    summary = pretrain(PretrainConfig(
        corpus=str(corpus_dir), out=str(run_dir), model_config=None, preset=None,
        overrides={**QUICKSTART_MODEL, "vocab_size": corpus.tokenizer.vocab_size},
        steps=10**6, batch_tokens=BATCH_SEQUENCES * config.n_ctx, lr=2e-3, min_lr=2e-4, optimizer="muon",
        warmup_steps=30, eval_interval=100, eval_batches=10, checkpoint_interval=250, max_seconds=minutes * 60,
        progress=progress))
    val = summary["val"]
    say(f"      validation loss {val['val_loss']:.3f} nats/token (perplexity {val['val_ppl']:.1f}, "
        f"{val['val_bpb']:.3f} bits/byte), {summary['tokens_per_s']:,.0f} tokens/s")

    model, tokenizer = load_model(run_dir)
    say("[3/4] samples (temperature 0.8, top-k 50):")
    prompts = sample_prompts
    samples = generate(model, tokenizer, prompts, SamplingConfig(max_new_tokens=60, temperature=0.8, top_k=50, seed=0))
    for p, (text,) in zip(prompts, samples):
        say("      " + (p + text).replace("\n", "\n      "))
        say("      ---")
    say(f"[4/4] after {prompt!r}, the model's next-token probabilities:")
    top = next_token_probs(model, tokenizer, prompt, 5)
    for r in top:
        say(f"      {r['token']!r:<14} {r['prob']:6.1%}")
    written = {"corpus": str(corpus_dir), "run": str(run_dir), "checkpoint": str(run_dir / "checkpoint"),
               "metrics": str(run_dir / "metrics.jsonl"), "loss_curve": summary.get("loss_curve")}
    say("written:")
    for k, v in written.items():
        if v:
            say(f"      {k:<11} {v}")
    say(f"done in {time.perf_counter() - t_start:.0f} s. Next: gptn generate {run_dir} --prompt {prompts[0]!r} ; "
        f"gptn next {run_dir} {prompt!r}")
    return {"summary": summary, "samples": samples, "next": top, "written": written}
