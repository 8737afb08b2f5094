"""Text normalisation: make a pretraining corpus read like the task's text (or the reverse).

SST-2 is lower-cased and tokenized the Penn Treebank way ("it 's a gorgeous , witty movie ."), IMDB
reviews keep their case, punctuation and `<br />` tags. A model pretrained on one sees the other as
new text. A normalisation is a list of steps, saved with the tokenizer (as Hugging Face tokenizers
keep their `normalizer`), so every later `encode` — fine-tuning, prediction, generation, the
server — applies exactly what `gptn prepare` applied to the corpus:

    html    `<br />` tags to spaces, HTML entities decoded (&amp; -> &)
    lower   lower case
    punct   Penn Treebank punctuation: `, . ; : ! ? ( )` and `--` / `...` split off, contractions split
            (`don't` -> `do n't`, `it's` -> `it 's`), double quotes as `` and ''
    sst     html, lower, punct: the text SST-2 (GLUE) holds
"""

from __future__ import annotations

import html
import re

from .config import GptnError

STEPS = ("html", "lower", "punct")
ALIASES = {"sst": ("html", "lower", "punct"), "none": ()}

_BR = re.compile(r"<\s*br\s*/?\s*>", re.IGNORECASE)
_TAG = re.compile(r"</?[a-zA-Z][^<>]{0,40}>")
_OPEN_QUOTE = re.compile(r'(^|[\s(\[{])"')
# No `\s*` around the mark: it made the pattern quadratic on a run of spaces (10k spaces: 2.6 s);
# the spaces it would have eaten are collapsed by _SPACES afterwards.
_SPLIT = re.compile(r"(\.\.\.|--|[,;:!?()\[\]{}]|``|'')")
_PERIOD = re.compile(r"(?<=[^\s.])\.(?=\s|$|['\"])")
_CONTRACTION = re.compile(r"(?i)(?<=\w)(n't|'s|'re|'ve|'m|'ll|'d)\b")
_SPACES = re.compile(r"[ \t\r\f\v]+")
_LINE_EDGES = re.compile(r" ?\n ?")


def parse_steps(spec: str | list | tuple | None) -> tuple[str, ...]:
    """Steps from `--normalize` ("sst", "html,lower", "none") in their canonical order."""
    if spec is None:
        return ()
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    steps: list[str] = []
    for name in (n.strip() for n in names):
        if not name:
            continue
        expanded = ALIASES.get(name, (name,))
        for step in expanded:
            if step not in STEPS:
                raise GptnError(f"--normalize {spec!r}: unknown step {name!r}; expected a comma list of "
                                f"{', '.join(STEPS)}, or one of {', '.join(ALIASES)}")
            steps.append(step)
    return tuple(s for s in STEPS if s in steps)


def _punct(text: str) -> str:
    text = text.replace("\u201c", '"').replace("\u201d", '"').replace("\u2019", "'").replace("\u2018", "'")
    text = _OPEN_QUOTE.sub(r"\1`` ", text).replace('"', " '' ")
    text = _CONTRACTION.sub(r" \1", text)
    text = _PERIOD.sub(" .", text)
    return _SPLIT.sub(r" \1 ", text)


def normalize(text: str, steps: tuple[str, ...]) -> str:
    """`text` after `steps` (see the module docstring); the identity for no steps."""
    if not steps:
        return text
    if "html" in steps:
        text = html.unescape(_TAG.sub(" ", _BR.sub(" ", text)))
    if "lower" in steps:
        text = text.lower()
    if "punct" in steps:
        text = _punct(text)
    return _LINE_EDGES.sub("\n", _SPACES.sub(" ", text)).strip()
