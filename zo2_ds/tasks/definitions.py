"""The task definitions: each task is one :class:`Task` value, not a class.

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

Templates, label words and sampling follow MeZO (princeton-nlp/MeZO, ``large_models/``), which
took most of its prompts from PromptSource; see the package README for where we differ.
"""

from __future__ import annotations

import string
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

__all__ = [
    "Task",
    "TASKS",
    "Objective",
    "get_task",
    "list_tasks",
    "make_task",
    "parse_label_words",
    "label_key",
    "template_fields",
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


# --- derived fields used by the MeZO templates ------------------------------------------------


def _sst2(row: dict) -> dict:
    return {"sentence": row["sentence"].strip()}


def _boolq(row: dict) -> dict:
    question = row["question"].strip()
    if not question.endswith("?"):
        question += "?"
    return {"question": question[:1].upper() + question[1:]}


def _wsc(row: dict) -> dict:
    return {"span2_lower": row["span2_text"].lower()}


def _copa_choice(text: str) -> str:
    # MeZO's "correct" capitalisation: lower-case the first word unless it is "I".
    words = text.split(" ")
    if words[0] != "I":
        words[0] = words[0].lower()
    return " ".join(words)


def _copa(row: dict) -> dict:
    premise = row["premise"].rstrip()
    if premise.endswith("."):
        premise = premise[:-1]
    conjunctions = {"effect": "so", "cause": "because"}
    if row["question"] not in conjunctions:
        raise ValueError(f"copa: question must be 'cause' or 'effect', got {row['question']!r}")
    return {
        "premise_stem": premise,
        "conjunction": conjunctions[row["question"]],
        "choices": [_copa_choice(row["choice1"]), _copa_choice(row["choice2"])],
    }


def _record(row: dict) -> dict:
    # MeZO's GPT-3 style ReCoRD prompt: the highlights become a dash list and each candidate is
    # the query with its @placeholder filled by one entity. Duplicate entities are dropped
    # (keeping the first), which changes no prediction.
    entities = list(dict.fromkeys(row["entities"]))
    answers = set(row["answers"])
    return {
        "passage_text": row["passage"].replace("@highlight\n", "- "),
        "continuations": [row["query"].replace("@placeholder", e) for e in entities],
        "label": [i for i, e in enumerate(entities) if e in answers],
    }


def _answer_texts(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, Mapping):  # SQuAD {"text": [...]}, DROP {"spans": [...]}
        value = value.get("text", value.get("spans"))
    return [str(v) for v in value]


def _squad(row: dict) -> dict:
    return {"question": row["question"].strip(), "gold_answers": _answer_texts(row["answers"])}


def _drop(row: dict) -> dict:
    return {"question": row["question"].strip(), "gold_answers": _answer_texts(row["answers_spans"])}


def _generic_answers(column: str) -> Callable[[dict], dict]:
    def prepare(row: dict) -> dict:
        return {"gold_answers": _answer_texts(row[column])}

    return prepare


_YES_NO = {"0": "Yes", "1": "No"}  # RTE: 0 = entailment
_NO_YES = {"0": "No", "1": "Yes"}
_SUPER_GLUE = "aps/super_glue"

TASKS: dict[str, Task] = {
    t.name: t
    for t in [
        Task(
            name="sst2",
            description="SST-2 sentiment (GLUE)",
            hub=("nyu-mll/glue", "sst2"),
            columns=("sentence", "label"),
            prepare=_sst2,
            template="{sentence} It was",
            label_words={"0": "terrible", "1": "great"},
        ),
        Task(
            name="rte",
            description="RTE entailment (SuperGLUE)",
            hub=(_SUPER_GLUE, "rte"),
            columns=("premise", "hypothesis", "label"),
            template='{premise}\nDoes this mean that "{hypothesis}" is true? Yes or No?\n',
            label_words=_YES_NO,
        ),
        Task(
            name="cb",
            description="CommitmentBank (SuperGLUE)",
            hub=(_SUPER_GLUE, "cb"),
            columns=("premise", "hypothesis", "label"),
            template='Suppose {premise} Can we infer that "{hypothesis}"? Yes, No, or Maybe?\n',
            label_words={"0": "Yes", "1": "No", "2": "Maybe"},
            max_num_dev=100,  # 250 training examples; MeZO's script uses DEV=100
        ),
        Task(
            name="boolq",
            description="BoolQ yes/no questions",
            hub=("google/boolq", None),
            columns=("passage", "question", "answer"),
            label_column="answer",
            prepare=_boolq,
            template="{passage} {question}\n",
            label_words={"true": "Yes", "false": "No"},
        ),
        Task(
            name="wsc",
            description="Winograd schema (SuperGLUE wsc.fixed)",
            hub=(_SUPER_GLUE, "wsc.fixed"),
            columns=("text", "span1_text", "span2_text", "label"),
            prepare=_wsc,
            template='{text}\nIn the previous sentence, does the pronoun "{span2_lower}" refer to {span1_text}? '
            "Yes or No?\n",
            label_words=_NO_YES,
        ),
        Task(
            name="wic",
            description="Words in context (SuperGLUE)",
            hub=(_SUPER_GLUE, "wic"),
            columns=("word", "sentence1", "sentence2", "label"),
            template='Does the word "{word}" have the same meaning in these two sentences? Yes, No?\n'
            "{sentence1}\n{sentence2}\n",
            label_words=_NO_YES,
        ),
        Task(
            name="multirc",
            description="Multi-sentence reading comprehension (SuperGLUE)",
            hub=(_SUPER_GLUE, "multirc"),
            columns=("paragraph", "question", "answer", "label"),
            template='{paragraph}\nQuestion: {question}\nI found this answer "{answer}". Is that correct? Yes or No?\n',
            label_words=_NO_YES,
        ),
        Task(
            name="copa",
            description="Choice of plausible alternatives (SuperGLUE)",
            hub=(_SUPER_GLUE, "copa"),
            columns=("premise", "choice1", "choice2", "question", "label"),
            prepare=_copa,
            template="{premise_stem} {conjunction}",
            candidates_field="choices",
            objective="answer_lm",  # MeZO trains COPA with --train_as_classification False
            max_num_dev=100,  # 400 training examples; MeZO's script uses DEV=100
        ),
        Task(
            name="record",
            description="Reading comprehension with commonsense (SuperGLUE ReCoRD)",
            hub=(_SUPER_GLUE, "record"),
            columns=("passage", "query", "entities", "answers"),
            prepare=_record,
            template="{passage_text}\n-",
            candidates_field="continuations",
            objective="answer_lm",  # MeZO trains ReCoRD with --train_as_classification False
        ),
        Task(
            name="squad",
            description="SQuAD v1.1 extractive QA (greedy generation, EM/F1)",
            hub=("rajpurkar/squad", None),
            columns=("title", "context", "question", "answers"),
            prepare=_squad,
            template="Title: {title}\nContext: {context}\nQuestion: {question}\nAnswer:",
            answers_field="gold_answers",
            objective="answer_lm",
            answer_suffix="\n",
        ),
        Task(
            name="drop",
            description="DROP discrete reasoning QA (greedy generation, EM/F1)",
            hub=("ucinlp/drop", None),
            columns=("passage", "question", "answers_spans"),
            prepare=_drop,
            template="Passage: {passage}\nQuestion: {question}\nAnswer:",
            answers_field="gold_answers",
            objective="answer_lm",
            answer_suffix="\n",
        ),
    ]
}


def list_tasks() -> list[str]:
    """The names of the built-in tasks."""
    return sorted(TASKS)


def get_task(name: str) -> Task:
    """A built-in task by name (case-insensitive, so MeZO's "SST2", "Copa", "ReCoRD" work)."""
    task = TASKS.get(name.lower())
    if task is None:
        raise ValueError(
            f"unknown task {name!r}; known tasks: {', '.join(list_tasks())} "
            "(or give a template to define your own task from a jsonl/csv file)"
        )
    return task


def parse_label_words(spec: str | Mapping[Any, str] | Sequence[str]) -> dict[str, str]:
    """Label words from the command line: ``"0:terrible,1:great"``, or ``"terrible,great"`` for
    labels 0, 1, ...; a list of such items (``["0:terrible", "1:great"]``, ``[" terrible", " great"]``)
    or a dict works too. Words are stripped: the space before a word comes from the prompt."""
    if isinstance(spec, Mapping):
        items = [(label_key(k), str(v).strip()) for k, v in spec.items()]
    else:
        raw = spec.split(",") if isinstance(spec, str) else [str(s) for s in spec]
        items = []
        for i, item in enumerate(raw):
            label, sep, word = item.partition(":")
            items.append((label_key(label), word.strip()) if sep else (str(i), item.strip()))
    out: dict[str, str] = {}
    for label, word in items:
        if not word or label in out:
            problem = "an empty word" if not word else f"label {label!r} twice"
            raise ValueError(f"label words {spec!r}: {problem}; expected 'label:word,label:word' or 'word,word'")
        out[label] = word
    if not out:
        raise ValueError(f"label words {spec!r}: no words given")
    return out


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
