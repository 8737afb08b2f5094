"""lm-evaluation-harness model class for gptn runs.

    import lm_eval
    from gptn.integrations.lm_eval import GptnLM
    results = lm_eval.simple_evaluate(model=GptnLM(run="runs/quickstart/run"), tasks=["lambada_openai"])

Importing this module registers the class as "gptn", so `model="gptn", model_args="pretrained=PATH"` works
too (`pretrained=`, the harness's own name, is what it names the results folder and `model_name` after;
`run=` is the same).
Requests are scored by the same functions `gptn fewshot` uses (shared contexts read once, the
vocabulary projection only where a continuation token is predicted).
"""

from __future__ import annotations

import lm_eval.models  # noqa: F401  # the harness fills its registry lazily only while it is empty:
from lm_eval.api.model import TemplateLM  # registering first would hide its own models ("hf", ...)
from lm_eval.api.registry import register_model

from ..inference import load_for_inference
from ..config import GptnError
from ..generate import generate
from ..sampling import SamplingConfig
from ..scoring import loglikelihood_tokens, score


@register_model("gptn")
class GptnLM(TemplateLM):
    """A gptn model for lm_eval.simple_evaluate: give `pretrained` (a run directory; `run` is the same) or
    `model` and `tokenizer`."""

    def __init__(self, run: str | None = None, model=None, tokenizer=None, batch_size: int | str = 32,
                 device: str = "cpu", max_gen_toks: int = 256, dtype: str = "fp32", pretrained: str | None = None,
                 **_ignored):
        super().__init__()
        run = run or pretrained
        if model is None:
            if run is None:
                raise GptnError("GptnLM needs pretrained=PATH (a run) or model= and tokenizer=")
            model, tokenizer = load_for_inference(run, str(device or "cpu"), dtype)  # the harness CLI may pass None
        if tokenizer is None:
            raise GptnError("GptnLM needs the model's tokenizer")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 32
        self.max_gen_toks = int(max_gen_toks)

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eot_id

    @property
    def max_length(self) -> int:
        return self.model.config.n_ctx

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer.encode(string)

    def tok_decode(self, tokens, **kwargs) -> str:
        return self.tokenizer.decode(tokens)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        scored = loglikelihood_tokens(self.model, [(ctx, cont) for _, ctx, cont in requests], self.batch_size)
        return [(ll, greedy) for ll, greedy, _ in scored]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        # The harness sums these itself: a plain float per document, not a tuple.
        return [score(self.model, self.tokenizer, req.args[0], stride=self.max_length).total_logprob
                if req.args[0] else 0.0 for req in requests]

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        # The harness leaves `until` and `max_gen_toks` to the model: both are applied here.
        out = []
        for req in requests:
            context, gen_kwargs = req.args
            gen_kwargs = dict(gen_kwargs or {})
            until = gen_kwargs.pop("until", None) or [self.tok_decode([self.eot_token_id])]
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(gen_kwargs.pop("max_gen_toks", self.max_gen_toks))
            temperature = float(gen_kwargs.pop("temperature", 0.0))
            do_sample = bool(gen_kwargs.pop("do_sample", temperature > 0))
            sampling = SamplingConfig(max_new_tokens=max_new, stop=until, greedy=not do_sample,
                                      temperature=temperature if do_sample else 1.0,
                                      top_p=gen_kwargs.pop("top_p", None), top_k=gen_kwargs.pop("top_k", None),
                                      seed=gen_kwargs.pop("seed", None))
            out.append(generate(self.model, self.tokenizer, [context], sampling)[0][0])
        return out


__all__ = ["GptnLM"]


def run_harness(run: str, harness_args: list[str]) -> None:
    """`gptn lm-eval RUN ...`: lm_eval's own command line with `--model gptn` and `pretrained=RUN` (so the
    results folder and `model_name` are the run's); --model_args are added to it, and the device is the
    one this machine has (the harness assumes CUDA)."""
    import sys
    from pathlib import Path

    from lm_eval.__main__ import cli_evaluate
    rest, extra = list(harness_args), ""
    for flag in ("--model_args", "--model-args"):
        while flag in rest:
            i = rest.index(flag)
            if i + 1 == len(rest):
                raise GptnError(f"{flag} needs a value, e.g. {flag} batch_size=16")
            extra += "," + rest.pop(i + 1)
            rest.pop(i)
    if any(a == "--model" or a.startswith("--model=") for a in rest):
        raise GptnError("gptn lm-eval always evaluates the gptn run it is given; drop --model")
    if not Path(run).is_dir():
        raise GptnError(f"run {run} does not exist")
    if not any(a == "--device" or a.startswith("--device=") for a in rest):
        import torch
        rest += ["--device", "cuda" if torch.cuda.is_available() else "cpu"]
    argv, sys.argv = sys.argv, ["lm-eval", "--model", "gptn", "--model_args", f"pretrained={run}{extra}", *rest]
    try:
        cli_evaluate()
    finally:
        sys.argv = argv
