"""The engine `gptn serve` had before continuous batching, kept here for benchmarks/serve.py to compare
against: a batch of requests with identical sampling settings runs until its longest row ends, and
requests that arrive meanwhile wait. It serves through gptn's own app (create_app(engine=...)).

    python benchmarks/static_engine.py RUN --port 8000 [--model-name NAME] [--max-batch 32]
"""

from __future__ import annotations

import argparse
import itertools
import queue
from pathlib import Path

import torch

from gptn.engine import MAX_BATCH, MAX_QUEUE, Job, _Call, _Engine
from gptn.generate import generate_ids
from gptn.sampling import SamplingConfig


class StaticEngine(_Engine):
    """A batch of requests with identical sampling settings runs until its longest row ends."""

    def __init__(self, *args, **kwargs):
        self._unique = itertools.count()
        super().__init__(*args, **kwargs)

    def submit(self, job: Job, reserved: bool = False) -> None:
        s = job.sampling
        seeded_sampling = s.seed is not None and not s.greedy  # alone, so that its seed reproduces it
        job.batch_key = (s.batch_key(), job.logprobs is not None, next(self._unique) if seeded_sampling else None)
        super().submit(job, reserved)

    def _loop(self) -> None:
        pending: list = []
        while True:
            if not pending:
                pending.append(self.inbox.get())
            while True:  # everything queued meanwhile
                try:
                    pending.append(self.inbox.get_nowait())
                except queue.Empty:
                    break
            first = pending[0]
            if isinstance(first, _Call):
                self._call(pending.pop(0))
                continue
            batch, rest, rows = [], [], 0
            for job in pending:
                if isinstance(job, Job) and job.batch_key == first.batch_key and \
                        (not batch or rows + len(job.rows) <= self.max_batch):
                    batch.append(job)
                    rows += len(job.rows)
                else:
                    rest.append(job)
            pending = rest
            try:
                self._run(batch)
            except Exception as e:  # a failure must reach the waiting requests, not kill the engine
                for job in batch:
                    job.emit({"error": f"{type(e).__name__}: {e}"})
            self._running_rows = 0

    @torch.no_grad()
    def _run(self, batch: list[Job]) -> None:
        owners = [(job, r) for job in batch for r in range(len(job.rows))]
        counts = [0] * len(owners)
        last = [[None] for _ in owners]
        for job in batch:
            self._started(job)
        self._running_rows = len(owners)
        max_new = max(job.max_tokens for job in batch)

        def on_token(row, token, info=None):
            job, r = owners[row]
            if job.cancelled:
                return True
            counts[row] += 1
            return self._token(job, r, token, info, counts[row], last[row])

        if max_new > 0:
            self._stepped(len(owners))
            prompts = [job.rows[r] for job, r in owners]
            generate_ids(self.model, prompts, SamplingConfig(**{**batch[0].sampling.__dict__, "max_new_tokens": max_new}),
                         pad_id=self.tokenizer.eot_id, on_token=on_token, warn=lambda _m: None,
                         logprobs=batch[0].logprobs)
        for job in batch:
            job.emit({"done": True})


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--model-name")
    ap.add_argument("--max-batch", type=int, default=MAX_BATCH)
    args = ap.parse_args()
    import uvicorn

    from gptn.inference import load_for_inference
    from gptn.serve import create_app, uvicorn_config
    model, tokenizer = load_for_inference(args.run)
    app = create_app(model, tokenizer, args.model_name or Path(args.run).resolve().name, max_batch=args.max_batch,
                     engine=StaticEngine(model, tokenizer, args.max_batch, MAX_QUEUE))
    uvicorn.Server(uvicorn_config(app, port=args.port)).run()


if __name__ == "__main__":
    main()
