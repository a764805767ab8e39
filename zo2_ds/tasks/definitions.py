"""The built-in tasks: MeZO's prompt-based tasks and the generated sentiment task of the default job.

Templates, label words and sampling follow MeZO (princeton-nlp/MeZO, ``large_models/``), which
took most of its prompts from PromptSource; see the package README for where we differ. How the
fields of a :class:`Task` combine is in ``task.py``.
"""

from __future__ import annotations

from zo2_ds.tasks.synthetic import SENTIMENT
from zo2_ds.tasks.task import Task, answer_texts

__all__ = ["TASKS", "get_task", "list_tasks"]

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


def _squad(row: dict) -> dict:
    return {"question": row["question"].strip(), "gold_answers": answer_texts(row["answers"])}


def _drop(row: dict) -> dict:
    return {"question": row["question"].strip(), "gold_answers": answer_texts(row["answers_spans"])}


_YES_NO = {"0": "Yes", "1": "No"}  # RTE: 0 = entailment
_NO_YES = {"0": "No", "1": "Yes"}
_SUPER_GLUE = "aps/super_glue"

TASKS: dict[str, Task] = {
    t.name: t
    for t in [
        SENTIMENT,
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
