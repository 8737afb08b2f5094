"""GPT versus BERT on the same code, corpus, size and pretraining compute.

Both are the same 4-layer network (d_model 128, context 128) built from gptn's blocks: GPT with the
causal mask and the next-token objective, BERT (`--arch bert`) without the mask, with segment
embeddings and the masked-LM objective (15% of tokens; 80% [MASK], 10% random, 10% kept). Both see
the same unlabeled corpus as benchmarks/transfer.py, for the same steps and tokens per step, so the
same training FLOPs. Then the same fine-tuning: 2,000 labeled SST-2 sentences (dev accuracy) and RTE
(dev accuracy): GPT with and without the auxiliary LM loss, BERT reading its [CLS] token.

    python benchmarks/gpt_vs_bert.py [--gpt-run /tmp/gptn-transfer/pretrained] [--pretrain-seconds 480]

With --gpt-run, the GPT pretrained by benchmarks/transfer.py is reused and BERT gets exactly its
steps and batch. Results: benchmarks/results/gpt_vs_bert.json with one entry `gpt` and one `bert`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SHARED, machine, seconds_per_step, table, write_results  # noqa: E402
from transfer import BATCH_SEQUENCES, MODEL, PRETRAIN_LR, build_data  # noqa: E402

from gptn.checkpoint import load_model  # noqa: E402
from gptn.compute import training_flops_per_token  # noqa: E402
from gptn.config import GPTConfig  # noqa: E402
from gptn.data import Corpus, prepare  # noqa: E402
from gptn.finetune import FinetuneConfig, finetune  # noqa: E402
from gptn.pretrain import PretrainConfig, pretrain  # noqa: E402

GLUE = SHARED / "glue"


def pretrain_arch(work: Path, arch: str, steps: int, batch_tokens: int) -> dict:
    s = pretrain(PretrainConfig(corpus=str(work / "corpus"), out=str(work / arch), overrides={**MODEL, "arch": arch},
                                steps=steps, batch_tokens=batch_tokens, lr=PRETRAIN_LR, min_lr=PRETRAIN_LR / 10,
                                warmup_steps=100,
                                eval_interval=steps, eval_batches=10, checkpoint_interval=steps, progress=False))
    return {"steps": s["steps"], "val_loss": s["val"]["val_loss"], "seconds": round(s["train_seconds"]),
            "objective": "next token" if arch == "gpt" else "masked tokens (15%)"}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/gptn-gpt-vs-bert")
    ap.add_argument("--gpt-run", help="reuse this GPT (pretrained by benchmarks/transfer.py on the same corpus)")
    ap.add_argument("--pretrain-seconds", type=float, default=480, help="per model, when pretraining both here")
    ap.add_argument("--lr", type=float, default=6.25e-4, help="fine-tuning learning rate (all runs)")
    args = ap.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    t_all = time.time()
    _, labeled_tsv = build_data(work)
    if args.gpt_run and (Path(args.gpt_run).parent / "corpus").is_dir():  # the very corpus the GPT was trained on
        shutil.copytree(Path(args.gpt_run).parent / "corpus", work / "corpus")
    else:
        prepare([str(work / "unlabeled.jsonl")], "bpe:4096", work / "corpus", val_fraction=0.02, progress=False)
    pre = {}
    if args.gpt_run:
        tc = json.loads((Path(args.gpt_run) / "train_config.json").read_text())
        steps, batch_tokens = json.loads((Path(args.gpt_run) / "checkpoint" / "meta.json").read_text())["step"], \
            tc["batch_tokens"]
        shutil.copytree(args.gpt_run, work / "gpt")
        gpt_model, _ = load_model(work / "gpt")
        pre["gpt"] = {"steps": steps, "reused": args.gpt_run, "objective": "next token"}
        if gpt_model.config.to_dict() != GPTConfig(**{**gpt_model.config.to_dict(), **MODEL}).to_dict():
            raise SystemExit(f"{args.gpt_run} is not the benchmark's model size {MODEL}")
    else:
        config = GPTConfig(vocab_size=Corpus(work / "corpus").tokenizer.vocab_size, **MODEL)
        batch_tokens = BATCH_SEQUENCES * MODEL["n_ctx"]
        steps = max(100, int(args.pretrain_seconds / seconds_per_step(config, BATCH_SEQUENCES)))
        pre["gpt"] = pretrain_arch(work, "gpt", steps, batch_tokens)
    pre["bert"] = pretrain_arch(work, "bert", steps, batch_tokens)
    for arch in ("gpt", "bert"):
        model, _ = load_model(work / arch)
        pre[arch]["flops"] = training_flops_per_token(model.config, model.config.n_ctx) * steps * batch_tokens
        pre[arch]["parameters"] = model.num_parameters()
        print(f"{arch}: {pre[arch]}", flush=True)

    def tune(arch, name, train, val, lm_weight):
        r = finetune(FinetuneConfig(run=str(work / arch), out=str(work / f"ft_{name}"), train=str(train),
                                    val=str(val), lr=args.lr, lm_weight=lm_weight, progress=False))
        print(f"{name}: {r['best']['value']:.4f} ({r['seconds']:.0f} s)", flush=True)
        return r["best"]["value"]

    tasks = {"SST-2 (2,000 train)": (labeled_tsv, GLUE / "SST-2" / "dev.tsv"),
             "RTE": (GLUE / "RTE" / "train.tsv", GLUE / "RTE" / "dev.tsv")}
    gpt, bert = {"pretraining": pre["gpt"]}, {"pretraining": pre["bert"]}
    for task, (train, val) in tasks.items():
        key = task.split()[0].lower().replace("-", "")
        gpt[f"{task} dev accuracy, aux LM"] = tune("gpt", f"{key}_gpt_aux", train, val, 0.5)
        gpt[f"{task} dev accuracy, no aux"] = tune("gpt", f"{key}_gpt_noaux", train, val, 0.0)
        bert[f"{task} dev accuracy"] = tune("bert", f"{key}_bert", train, val, 0.0)

    refusal = subprocess.run([sys.executable, "-m", "gptn", "generate", str(work / "bert"), "--prompt", "the movie"],
                             capture_output=True, text=True)
    bert["generate"] = {"exit_code": refusal.returncode, "message": refusal.stderr.strip()}
    gpt["can"] = ["generate text (gptn generate)", "next-token probabilities (gptn next)",
                  "zero-/one-/few-shot prompting (gptn fewshot)", "fine-tuning (gptn finetune)"]
    bert["can"] = ["fine-tuning (gptn finetune), reading [CLS] with both-sided context"]
    bert["cannot"] = ["generate text", "few-shot prompting", "score text left to right"]

    rows = []
    for task in tasks:
        rows.append((task, f"{100 * gpt[f'{task} dev accuracy, aux LM']:.1f}",
                     f"{100 * gpt[f'{task} dev accuracy, no aux']:.1f}", f"{100 * bert[f'{task} dev accuracy']:.1f}"))
    print(table(rows, ("dev accuracy (%)", "GPT, aux LM", "GPT, no aux", "BERT")))
    print(f"pretraining compute, each: {pre['gpt']['flops']:.3g} FLOPs ({steps} steps x {batch_tokens} tokens)")
    print(f"gptn generate on the BERT run: exit {refusal.returncode}: {refusal.stderr.strip()}")
    results = {"gpt": gpt, "bert": bert, "setup": {"model": MODEL, "fine_tuning_lr": args.lr,
               "corpus": "SST-2 train minus the 2,000 labeled + RTE/MRPC/STS-B train sentences, labels removed"},
               "total_seconds": round(time.time() - t_all), "machine": machine()}
    print(f"wrote {write_results('gpt_vs_bert', results)}")


if __name__ == "__main__":
    main()
