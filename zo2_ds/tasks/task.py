"""What a task is: one :class:`Task` value (not a class), and the helpers that build one.

A task says how to turn one raw row of its dataset into a prompt and an answer:

- ``template``: a ``str.format`` template over the row's fields. The rendered prompt ends right
  before the answer (MeZO's ``encode``); spaces at both ends are stripped, as MeZO does.
- the answer, one of
  ``label_words`` (label value -> word; the candidates are the words, in this order),
  ``candidates_field`` (a field holding the candidate continuations; the label is an index, or a
  list of indices when several candidates are correct), or
  ``answers_field`` (a field holding the gold answer strings: a generation task).
- ``prepare``: an optional pure function ``row -> dict`` of derived fields (a trailing period
  dropped, a question capitalised, ...) that are merged over the row before rendering.

A candidate or answer is appended to the prompt after one space, unless the prompt already ends
in whitespace (a newline): ``"... It was" + " great"``, ``"... Yes or No?\\n" + "Yes"``.

A task's rows come from a dataset (hub, local files) or, for a generated task, from its
``generate`` function (``zo2_ds.tasks.synthetic``). The built-in tasks are in ``definitions.py``.
"""

from __future__ import annotations

import string
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

__all__ = [
    "Task",
    "Objective",
    "answer_texts",
    "label_key",
    "make_task",
    "parse_label_words",
    "template_fields",
    "with_overrides",
]

Objective = Literal["candidates", "answer_lm", "neg_f1"]
_OBJECTIVES = ("candidates", "answer_lm", "neg_f1")


def label_key(value: Any) -> str:
    """The canonical string form of a label value, so 1, "1", 1.0 and True/"true" compare equal."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip().lower()


def template_fields(template: str) -> tuple[str, ...]:
    """The field names a ``str.format`` template reads, in order of first use."""
    names: list[str] = []
    for _, name, _, _ in string.Formatter().parse(template):
        if name is None:
            continue
        base = name.split(".")[0].split("[")[0]
        if not base:
            raise ValueError(f"template {template!r} uses a positional field {{}}; name every field, e.g. {{sentence}}")
        if base not in names:
            names.append(base)
    return tuple(names)


@dataclass(frozen=True, kw_only=True)
class Task:
    """One prompt-based task. See the module docstring for how the fields combine.

    objective: what training minimises.
        "candidates": cross-entropy over the candidates' scores (MeZO's ``train_as_classification``);
        "answer_lm":  LM loss on the gold answer's tokens only (MeZO's ``only_train_option``);
        "neg_f1":     -F1 of the greedy decode (MeZO's ``non_diff``; generation tasks only).
    A candidate's score is the *mean* log-probability of its tokens, as in MeZO (both its training
    loss and its evaluation); for single-token label words mean and sum coincide.
    """

    name: str
    template: str
    columns: tuple[str, ...]
    label_words: Mapping[str, str] | None = None
    candidates_field: str | None = None
    answers_field: str | None = None
    label_column: str = "label"
    prepare: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    objective: Objective = "candidates"
    hub: tuple[str, str | None] | None = None
    train_split: str = "train"
    eval_split: str = "validation"
    max_num_dev: int | None = None
    answer_suffix: str = ""
    max_new_tokens: int = 50
    generate: Callable[[int], Mapping[str, Sequence[dict[str, Any]]]] | None = field(default=None, compare=False)
    """A generated task's data: ``generate(seed)`` returns its "train", "dev" and "test" rows, which are
    used whole and in order (no sampling): the held-out splits are the generator's to design."""
    vocabulary: tuple[str, ...] = field(default=(), repr=False, compare=False)
    """Every word a generated task can produce: the in-process tokenizer's vocabulary when no model is given."""
    description: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        answer_kinds = [self.label_words is not None, self.candidates_field is not None, self.answers_field is not None]
        if sum(answer_kinds) != 1:
            raise ValueError(f"task {self.name!r}: give exactly one of label_words, candidates_field, answers_field")
        if self.objective not in _OBJECTIVES:
            raise ValueError(f"task {self.name!r}: objective {self.objective!r} is not one of {_OBJECTIVES}")
        if self.is_generation and self.objective == "candidates":
            raise ValueError(f"task {self.name!r}: a generation task trains with 'answer_lm' or 'neg_f1'")
        if not self.is_generation and self.objective == "neg_f1":
            raise ValueError(f"task {self.name!r}: 'neg_f1' needs a generation task (answers_field)")
        if self.generate is not None and not self.vocabulary:
            raise ValueError(f"task {self.name!r}: a generated task lists its vocabulary")
        if self.label_words is not None:
            if not self.label_words:
                raise ValueError(f"task {self.name!r}: label_words is empty")
            normalised = {label_key(k): v for k, v in self.label_words.items()}
            if len(normalised) != len(self.label_words):
                raise ValueError(f"task {self.name!r}: label_words has duplicate labels: {dict(self.label_words)}")
            object.__setattr__(self, "label_words", normalised)
        template_fields(self.template)  # fail early on a malformed template

    @property
    def is_generation(self) -> bool:
        return self.answers_field is not None

    @property
    def metric(self) -> str:
        """The headline metric: "accuracy" for classification, "f1" for generation (em is reported too)."""
        return "f1" if self.is_generation else "accuracy"

    def fields(self, row: Mapping[str, Any]) -> dict[str, Any]:
        """The row with the derived fields of ``prepare`` merged over it."""
        out = dict(row)
        if self.prepare is not None:
            out.update(self.prepare(out))
        return out


def answer_texts(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, Mapping):  # SQuAD {"text": [...]}, DROP {"spans": [...]}
        value = value.get("text", value.get("spans"))
    return [str(v) for v in value]


def _generic_answers(column: str) -> Callable[[dict], dict]:
    def prepare(row: dict) -> dict:
        return {"gold_answers": answer_texts(row[column])}

    return prepare


def parse_label_words(spec: str | Mapping[Any, str] | Sequence[str]) -> dict[str, str]:
    """Label words, the one syntax everywhere: ``"0:terrible,1:great"``, or ``"terrible,great"`` for
    labels 0, 1, ...; a list of such items (``["0:terrible", "1:great"]``, ``[" terrible", " great"]``)
    or a dict works too. Words are stripped: the space before a word comes from the prompt."""
    if isinstance(spec, Mapping):
        items = [(label_key(k), str(v).strip()) for k, v in spec.items()]
    else:
        raw = spec.split(",") if isinstance(spec, str) else [str(s) for s in spec]
        items = []
        for i, item in enumerate(raw):
            label, sep, word = item.partition(":")
            if not sep and _looks_like_old_syntax(item):
                old_label, _, old_word = item.partition("=")
                raise ValueError(
                    f"label words {spec!r}: LABEL=WORD is no longer accepted; write LABEL:WORD "
                    f"(here {old_label}:{old_word.strip()})"
                )
            items.append((label_key(label), word.strip()) if sep else (str(i), item.strip()))
    out: dict[str, str] = {}
    for label, word in items:
        if not word or label in out:
            problem = "an empty word" if not word else f"label {label!r} twice"
            raise ValueError(f"label words {spec!r}: {problem}; expected 'label:word,label:word' or 'word,word'")
        out[label] = word
    if len(out) < 2 and not isinstance(spec, Mapping):
        raise ValueError(f"label words {spec!r}: give one word per class (at least 2)")
    if not out:
        raise ValueError(f"label words {spec!r}: no words given")
    return out


def _looks_like_old_syntax(item: str) -> bool:
    """``neg= terrible``: the LABEL=WORD form of an earlier command line (a label, then ``=``)."""
    label, sep, word = item.partition("=")
    return bool(sep and label.strip() and " " not in label.strip() and word.strip())


def make_task(
    name: str,
    template: str,
    label_words: str | Mapping[Any, str] | list[str] | None = None,
    *,
    label_column: str = "label",
    answer_column: str = "answer",
    objective: Objective | None = None,
) -> Task:
    """A task for a user's own data file: a template over its columns plus label words
    (classification on ``label_column``), or no label words (generation: greedy decode scored by
    EM/F1 against ``answer_column``, a string or a list of strings)."""
    columns = template_fields(template)
    if not columns:
        raise ValueError(f"template {template!r} reads no column; write e.g. 'Review: {{sentence}} Sentiment:'")
    if label_words is not None:
        return Task(
            name=name,
            template=template,
            columns=columns + (label_column,),
            label_words=parse_label_words(label_words),
            label_column=label_column,
            objective=objective or "candidates",
            description="user task",
        )
    return Task(
        name=name,
        template=template,
        columns=columns + (answer_column,),
        answers_field="gold_answers",
        prepare=_generic_answers(answer_column),
        objective=objective or "answer_lm",
        answer_suffix="\n",
        description="user generation task",
    )


def with_overrides(
    task: Task,
    *,
    template: str | None = None,
    label_words: str | Mapping[Any, str] | list[str] | None = None,
    objective: Objective | None = None,
) -> Task:
    """``task`` with a different template, label words or objective (validated again)."""
    changes: dict[str, Any] = {}
    if template is not None:
        changes["template"] = template
    if label_words is not None:
        if task.label_words is None:
            raise ValueError(f"task {task.name!r} has no label words to replace (its answers come from the data)")
        changes["label_words"] = parse_label_words(label_words)
    if objective is not None:
        changes["objective"] = objective
    return replace(task, **changes) if changes else task
