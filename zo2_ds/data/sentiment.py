"""The embedded default task: templated movie-review-style sentiment, generated and tokenized in-process.

A sentence is a *frame* (template, subject, verb, adverb) filled with one sentiment adjective, e.g.
"i thought the movie was truly wonderful ."; the prompt appends " It was" and the label words are
" terrible" (0) and " great" (1), as in MeZO's SST-2 prompt.

The held-out split is honest: frames are split between train, dev and test, so no evaluated sentence
(nor its frame) occurs in training. The adjectives are shared: a randomly initialised model can only
learn what a word means from seeing it, and what is tested is whether that knowledge carries over to
sentences it has never seen.
"""

from __future__ import annotations

import itertools
import random

from zo2_ds.data.candidates import TaskData, TaskInfo
from zo2_ds.data.tokenizer import build_word_tokenizer

__all__ = ["DEFAULT_TASK_NAME", "load_default_task", "default_task_words"]

DEFAULT_TASK_NAME = "synthetic_sentiment"

TEMPLATES = (
    "{subject} {verb} {adverb} {adjective} .",
    "i thought {subject} {verb} {adverb} {adjective} .",
    "honestly , {subject} {verb} {adverb} {adjective} .",
    "in my opinion {subject} {verb} {adverb} {adjective} .",
)
SUBJECTS = (
    "the movie",
    "the film",
    "the show",
    "the play",
    "the book",
    "the story",
    "the album",
    "the concert",
    "the acting",
    "the ending",
    "the plot",
    "the music",
)
VERBS = ("was", "felt", "seemed", "looked", "sounded")
ADVERBS = ("truly", "really", "very", "quite", "simply", "rather", "so", "absolutely")
POSITIVE = ("wonderful", "amazing", "brilliant", "delightful", "excellent", "fantastic", "lovely", "superb")
NEGATIVE = ("dreadful", "awful", "boring", "horrible", "dull", "painful", "disappointing", "bad")
PROMPT = "{sentence} It was"
LABEL_WORDS = (" terrible", " great")  # index = label: 0 negative, 1 positive


def default_task_words() -> list[str]:
    """Every word the task can produce; the tokenizer's vocabulary."""
    text = " ".join([*TEMPLATES, *SUBJECTS, *VERBS, *ADVERBS, *POSITIVE, *NEGATIVE, PROMPT, *LABEL_WORDS])
    for placeholder in ("{subject}", "{verb}", "{adverb}", "{adjective}", "{sentence}"):
        text = text.replace(placeholder, " ")
    return text.replace(",", " , ").replace(".", " . ").split()


def _split_frames(seed: int, dev_fraction: float, test_fraction: float) -> tuple[list, list, list]:
    frames = list(itertools.product(TEMPLATES, SUBJECTS, VERBS, ADVERBS))
    random.Random(seed).shuffle(frames)
    num_dev = round(len(frames) * dev_fraction)
    num_test = round(len(frames) * test_fraction)
    return frames[num_dev + num_test :], frames[:num_dev], frames[num_dev : num_dev + num_test]


def _examples(frames: list, adjectives_per_frame: int, rng: random.Random, tokenizer, candidate_ids) -> list[dict]:
    examples = []
    for template, subject, verb, adverb in frames:
        # Each frame appears with as many positive as negative adjectives, so a frame carries no label.
        chosen = [(a, 1) for a in rng.sample(POSITIVE, adjectives_per_frame)]
        chosen += [(a, 0) for a in rng.sample(NEGATIVE, adjectives_per_frame)]
        for adjective, label in chosen:
            sentence = template.format(subject=subject, verb=verb, adverb=adverb, adjective=adjective)
            prompt = PROMPT.format(sentence=sentence)
            examples.append(
                {
                    "text": prompt,
                    "input_ids": tokenizer(prompt)["input_ids"],
                    "candidate_ids": candidate_ids,
                    "label": label,
                }
            )
    rng.shuffle(examples)
    return examples


def load_default_task(
    *, seed: int = 0, dev_fraction: float = 0.1, test_fraction: float = 0.1, adjectives_per_frame: int = 1
) -> tuple[TaskData, object]:
    """The default task and its tokenizer: ``(task_data, tokenizer)``. Same seed, same data, everywhere."""
    tokenizer = build_word_tokenizer(default_task_words())
    candidate_ids = []
    for word in LABEL_WORDS:
        ids = tokenizer(word, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1 and ids[0] != tokenizer.unk_token_id, f"label word {word!r} is not one known token"
        candidate_ids.append(ids[0])
    train_frames, dev_frames, test_frames = _split_frames(seed, dev_fraction, test_fraction)
    rng = random.Random(seed + 1)
    splits = [
        _examples(f, adjectives_per_frame, rng, tokenizer, candidate_ids)
        for f in (train_frames, dev_frames, test_frames)
    ]
    info = TaskInfo(name=DEFAULT_TASK_NAME, metric="accuracy", label_words=LABEL_WORDS, template=PROMPT)
    data = TaskData(
        task=info,
        train=splits[0],
        dev=splits[1],
        test=splits[2],
        pad_token_id=tokenizer.pad_token_id,
        tokenizer=tokenizer,
    )
    return data, tokenizer
