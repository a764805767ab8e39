"""One test per task definition: the prompt, the candidates and the gold answer of a known row,
the candidate tokens, and the task end to end on a tiny model."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from task_fixtures import TASK_NAMES, task_rows

from zo2_ds.tasks import TASKS, Task, get_task, list_tasks, load_task_data, make_task, parse_label_words
from zo2_ds.tasks.encode import encode_rows

# Row 0 of each task's train split (see conftest._row): the prompt MeZO's template gives, the
# continuations appended to it, and the index of the correct one.
EXPECTED = {
    "sst2": ("the cat fish stone bread window film It was", [" terrible", " great"], [0]),
    "rte": (
        'The cat fish stone bread window.\nDoes this mean that "a fish is here" is true? Yes or No?\n',
        ["Yes", "No"],
        [0],
    ),
    "cb": (
        'Suppose The cat fish stone bread window. Can we infer that "a fish is here"? Yes, No, or Maybe?\n',
        ["Yes", "No", "Maybe"],
        [0],
    ),
    "boolq": ("The cat fish stone bread window. Is the cat red?\n", ["Yes", "No"], [1]),
    "wsc": (
        'The cat saw the stone because It was near.\nIn the previous sentence, does the pronoun "it" refer to '
        "the cat? Yes or No?\n",
        ["No", "Yes"],
        [0],
    ),
    "wic": (
        'Does the word "cat" have the same meaning in these two sentences? Yes, No?\nThe cat sat.\nA cat ran.\n',
        ["No", "Yes"],
        [0],
    ),
    "multirc": (
        'The cat fish stone bread window.\nQuestion: Where is the cat?\nI found this answer "near the bread". '
        "Is that correct? Yes or No?\n",
        ["No", "Yes"],
        [0],
    ),
    "copa": ("The cat fell because", [" the fish broke.", " I saw the stone."], [0]),
    "record": (
        "The cat fish stone bread window story.\n- Fish met Stone\n- Bread left\n-",
        [" Fish went home", " Stone went home", " Bread went home"],
        [0],
    ),
    "squad": (
        "Title: Cat\nContext: The cat fish stone bread window is in the window.\nQuestion: Where is the cat?\nAnswer:",
        [" the window\n"],
        [0],
    ),
    "drop": (
        "Passage: The cat fish stone bread window scored 2 points.\nQuestion: How many points did the cat score?\n"
        "Answer:",
        [" 2\n"],
        [0],
    ),
}


def test_registry_lists_the_mezo_tasks_and_the_generated_one():
    assert list_tasks() == sorted([*TASK_NAMES, "synthetic_sentiment"]) and sorted(TASK_NAMES) == sorted(EXPECTED)
    assert get_task("SST2") is TASKS["sst2"] and get_task("ReCoRD") is TASKS["record"]


@pytest.mark.parametrize("name", TASK_NAMES)
def test_task_renders_row_and_tokenizes_candidates(name, tokenizer):
    task = get_task(name)
    prompt, candidates, gold = EXPECTED[name]
    (example,) = encode_rows(task, task_rows(name, "train")[:1], tokenizer, max_length=256, source="test")
    assert example["prompt"] == prompt
    assert example["candidates"] == candidates
    assert example["gold"] == gold and example["target"] == gold[0]
    for c, cont in enumerate(candidates):
        row, tokens = example["rows"][example["cand_rows"][c]], example["cand_tokens"][c]
        # The row plus the candidate's tokens is the tokenization of prompt + continuation ...
        assert row + [tokens[-1]] == tokenizer(prompt + cont)["input_ids"]
        # ... and the candidate tokens decode back to the declared continuation.
        assert tokenizer.decode(tokens) == cont
    if task.label_words is not None:
        # Label words are single tokens here, so all candidates share one row (one sequence per example).
        assert all(len(t) == 1 for t in example["cand_tokens"])
        assert len(example["rows"]) == 1
    if task.is_generation:
        assert example["prompt_ids"] == tokenizer(prompt)["input_ids"]
        assert example["answers"] == task.fields(task_rows(name, "train")[0])["gold_answers"]


@pytest.mark.parametrize("name", TASK_NAMES)
def test_task_end_to_end_on_tiny_model(name, tokenizer, opt_model, task_data_dir):
    task = replace(get_task(name), max_new_tokens=4)  # short decodes keep the test fast
    data = load_task_data(task, tokenizer, data_dir=task_data_dir, num_train=4, num_dev=2, num_test=3, seed=1)
    assert (len(data.train), len(data.dev), len(data.test)) == (4, 2, 3)
    uids = [ex["uid"] for split in (data.train, data.dev, data.test) for ex in split]
    assert len(set(uids)) == len(uids)
    with torch.no_grad():
        loss = data.wrap_model(opt_model)(**data.collate(data.train[:2]))
    assert loss.dim() == 0 and math.isfinite(loss.item())
    metrics = data.evaluate(opt_model, data.test, batch_size=2, device="cpu")
    assert set(metrics) == ({"em", "f1"} if task.is_generation else {"accuracy"})
    assert all(0.0 <= v <= 1.0 for v in metrics.values())


def test_label_words_parse_and_user_task_renders(tokenizer):
    assert parse_label_words("0:terrible,1:great") == {"0": "terrible", "1": "great"}
    assert parse_label_words("terrible, great") == {"0": "terrible", "1": "great"}
    assert parse_label_words({True: "Yes", False: "No"}) == {"true": "Yes", "false": "No"}
    assert parse_label_words([" terrible", " great"]) == parse_label_words(["0:terrible", "1:great"])
    task = make_task("mine", "Review: {sentence} Sentiment:", "0:terrible,1:great")
    assert task.columns == ("sentence", "label")
    (example,) = encode_rows(task, [{"sentence": "a cat", "label": "1"}], tokenizer, max_length=64, source="test")
    assert example["prompt"] == "Review: a cat Sentiment:"
    assert example["candidates"] == [" terrible", " great"] and example["gold"] == [1]


def test_task_definition_is_validated():
    with pytest.raises(ValueError, match="exactly one of"):
        Task(name="x", template="{a}", columns=("a",))
    with pytest.raises(ValueError, match="generation task"):
        replace(get_task("sst2"), objective="neg_f1")
    with pytest.raises(ValueError, match="positional field"):
        make_task("x", "Review: {} Sentiment:", "a,b")
    with pytest.raises(ValueError, match="label '0' twice"):
        parse_label_words("0:a,0:b")
    with pytest.raises(ValueError, match="at least 2"):
        parse_label_words(["great"])
    with pytest.raises(ValueError, match=r"LABEL=WORD is no longer accepted; write LABEL:WORD \(here neg:terrible\)"):
        parse_label_words(["neg= terrible", "pos= great"])  # the syntax of the former zo2_ds.data parser
    assert parse_label_words(["==", "!="]) == {"0": "==", "1": "!="}  # words that hold "=" are still words
