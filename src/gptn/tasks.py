"""Labeled task files: the examples GPT-1's fine-tuning and GPT-3's prompts read.

GLUE's TSVs (SST-2, CoLA, MRPC, STS-B, RTE, WNLI, QNLI) are recognised by their header, task type
included; CSV and JSONL by named columns; multiple choice from JSONL (context + endings / choices +
label) or HellaSwag's 6-lines-per-item text. Every bad row is refused in one line naming the file
and the row.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .config import GptnError
from .options import option
from .data import read_records
from .task_types import TASK_TYPES


# ----------------------------------------------------------------------------------------------
# Examples and the file layouts they come from


@dataclass
class Example:
    """One labeled (or unlabeled) input: `segments` are (text,), (A, B) or (context,) for multiple choice."""

    segments: tuple[str, ...]
    label: str | float | int | None = None  # a class name, a score, or the index of the right choice
    choices: tuple[str, ...] = ()


@dataclass
class Columns:
    """Column (field) names to read from a TSV/CSV/JSONL file; None means "recognise the layout"."""

    text_col: str | None = option(None, "column with the text (premise, sentence A, context); GLUE, "
                                        "multiple-choice JSONL and HellaSwag layouts need no column flags")
    text_b_col: str | None = option(None, "column with the second text (hypothesis, sentence B)")
    label_col: str | None = option(None, "column with the label (class, score or right choice's index)")
    choices_col: str | None = option(None, "JSONL field with the list of candidate answers")


# Known layouts: header columns -> (task, regression, text, text_b, label). GLUE's TSVs, as released.
KNOWN_LAYOUTS = [
    ({"sentence", "label"}, ("classification", False, "sentence", None, "label")),  # SST-2, CoLA
    ({"sentence1", "sentence2", "score"}, ("similarity", True, "sentence1", "sentence2", "score")),  # STS-B
    ({"#1 String", "#2 String", "Quality"}, ("similarity", False, "#1 String", "#2 String", "Quality")),  # MRPC
    ({"sentence1", "sentence2", "label"}, ("entailment", False, "sentence1", "sentence2", "label")),  # RTE, WNLI
    ({"question", "sentence", "label"}, ("entailment", False, "question", "sentence", "label")),  # QNLI
    ({"premise", "hypothesis", "label"}, ("entailment", False, "premise", "hypothesis", "label")),  # SNLI-style
    ({"text", "label"}, ("classification", False, "text", None, "label")),
]
MC_CONTEXT_FIELDS = ("context", "ctx", "question", "goal")
MC_CHOICE_FIELDS = ("endings", "choices", "options")


@dataclass
class TaskData:
    task: str
    regression: bool
    examples: list[Example]


def _read_hellaswag_text(path: Path) -> list[Example]:
    """HellaSwag's 6-lines-per-item text layout: context, gold index, four endings."""
    lines = path.read_text(encoding="utf-8").split("\n")
    while lines and not lines[-1]:
        lines.pop()
    if len(lines) % 6:
        raise GptnError(f"{path}: {len(lines)} lines; the multiple-choice text layout has 6 lines per item")
    out = []
    for i in range(0, len(lines), 6):
        if not lines[i + 1].strip().isdigit() or not 0 <= int(lines[i + 1]) < 4:
            raise GptnError(f"{path}:{i + 2}: expected the gold ending's index 0-3, got {lines[i + 1]!r}")
        out.append(Example((lines[i],), int(lines[i + 1]), tuple(lines[i + 2:i + 6])))
    return out


def _first_present(row: dict, names) -> str | None:
    return next((n for n in names if n in row), None)


def read_task_file(path: str | Path, task: str | None = None, columns: Columns | None = None,
                   regression: bool | None = None, require_labels: bool = True) -> TaskData:
    """Examples from a TSV/CSV/JSONL file (GLUE, multiple-choice JSONL and HellaSwag text recognised)."""
    path = Path(path)
    columns = columns or Columns()
    if task is not None and task not in TASK_TYPES:
        raise GptnError(f"--task {task!r}: expected one of {', '.join(TASK_TYPES)}")
    if not path.is_file():
        raise GptnError(f"data file {path} does not exist")
    if path.suffix == ".txt":
        if task not in (None, "multiple_choice"):
            raise GptnError(f"{path}: a .txt file is read as HellaSwag's multiple-choice layout, not as {task}")
        return TaskData("multiple_choice", False, _read_hellaswag_text(path))
    rows = read_records(path)
    if not rows:
        raise GptnError(f"{path} holds no examples")
    first = rows[0]
    text, text_b, label, choices = columns.text_col, columns.text_b_col, columns.label_col, columns.choices_col
    guessed_regression = False
    mc_choices = columns.choices_col or _first_present(first, MC_CHOICE_FIELDS)
    if task is not None and TASK_TYPES[task].choices or \
            task is None and mc_choices and isinstance(first.get(mc_choices), list):
        task, choices = task or "multiple_choice", mc_choices
        text = text or _first_present(first, MC_CONTEXT_FIELDS)
        label = label or _first_present(first, ("label", "gold", "answer"))
    elif text is None:
        for keys, layout in KNOWN_LAYOUTS:
            needed = keys if require_labels else keys - {layout[4]}
            if needed <= set(first) and (task is None or task == layout[0] or
                                       (task == "similarity" and layout[0] == "entailment")):
                task = task or layout[0]
                guessed_regression, text, text_b, label = layout[1:]
                break
    if text is None or task is None:
        raise GptnError(f"{path}: unrecognised layout (columns {sorted(first)}); name the task and columns "
                        "with --task and --text-col/--text-b-col/--label-col")
    regression = guessed_regression if regression is None else regression
    pair = TASK_TYPES[task].texts == 2
    if pair and text_b is None:
        raise GptnError(f"{path}: a {task} task needs a second text column (--text-b-col)")
    out = []
    for n, row in enumerate(rows, 1):
        for col in (text, text_b, choices):
            if col is not None and col not in row:
                raise GptnError(f"{path}: example {n} has no field {col!r} (fields: {sorted(row)})")
        value = row.get(label) if label else None
        if value is None and require_labels:
            raise GptnError(f"{path}: example {n} has no label field {label!r}")
        segs = (str(row[text]).strip(),) + ((str(row[text_b]).strip(),) if pair else ())
        if TASK_TYPES[task].choices:
            opts = row[choices]
            if not isinstance(opts, list) or len(opts) < 2:
                raise GptnError(f"{path}: example {n}: field {choices!r} must be a list of at least 2 answers")
            if value is not None:
                try:
                    value = int(value)
                except (TypeError, ValueError):
                    raise GptnError(f"{path}: example {n}: label {value!r} is not a choice index") from None
                if not 0 <= value < len(opts):
                    raise GptnError(f"{path}: example {n}: label {value} is outside 0..{len(opts) - 1}")
            out.append(Example(segs, value, tuple(str(o).strip() for o in opts)))
            continue
        if value is not None:
            if regression:
                try:
                    value = float(value)
                except (TypeError, ValueError):
                    raise GptnError(f"{path}: example {n}: score {value!r} is not a number") from None
            else:
                value = str(value).strip()
        out.append(Example(segs, value))
    return TaskData(task, regression, out)


__all__ = ["Example", "Columns", "TaskData", "read_task_file"]
