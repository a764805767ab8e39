"""The generated task of the default job: movie-review-style sentiment, written in-process from a seed.

A sentence is a *frame* (template, subject, verb, adverb) filled with one sentiment adjective, e.g.
"i thought the movie was truly wonderful ."; the task's prompt is SST-2's, ``"{sentence} It was"``,
and its label words are " terrible" (0) and " great" (1).

The held-out splits are honest: frames are split between train, dev and test, so no evaluated
sentence (nor its frame) occurs in training. The adjectives are shared: a randomly initialised model
can only learn what a word means from seeing it, and what is tested is whether that knowledge
carries over to sentences it has never seen.
"""

from __future__ import annotations

import itertools
import random

from zo2_ds.tasks.task import Task

__all__ = ["SENTIMENT", "generate_sentiment"]

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
LABEL_WORDS = {"0": "terrible", "1": "great"}  # 0 negative, 1 positive


def _vocabulary() -> tuple[str, ...]:
    """Every word the task can produce (the word tokenizer's vocabulary, in a fixed order)."""
    text = " ".join([*TEMPLATES, *SUBJECTS, *VERBS, *ADVERBS, *POSITIVE, *NEGATIVE, PROMPT, *LABEL_WORDS.values()])
    for placeholder in ("{subject}", "{verb}", "{adverb}", "{adjective}", "{sentence}"):
        text = text.replace(placeholder, " ")
    return tuple(text.replace(",", " , ").replace(".", " . ").split())


def _split_frames(seed: int, dev_fraction: float, test_fraction: float) -> tuple[list, list, list]:
    frames = list(itertools.product(TEMPLATES, SUBJECTS, VERBS, ADVERBS))
    random.Random(seed).shuffle(frames)
    num_dev = round(len(frames) * dev_fraction)
    num_test = round(len(frames) * test_fraction)
    return frames[num_dev + num_test :], frames[:num_dev], frames[num_dev : num_dev + num_test]


def _rows(frames: list, adjectives_per_frame: int, rng: random.Random) -> list[dict]:
    rows = []
    for template, subject, verb, adverb in frames:
        # Each frame appears with as many positive as negative adjectives, so a frame carries no label.
        chosen = [(a, 1) for a in rng.sample(POSITIVE, adjectives_per_frame)]
        chosen += [(a, 0) for a in rng.sample(NEGATIVE, adjectives_per_frame)]
        for adjective, label in chosen:
            sentence = template.format(subject=subject, verb=verb, adverb=adverb, adjective=adjective)
            rows.append({"sentence": sentence, "label": label})
    rng.shuffle(rows)
    return rows


def generate_sentiment(
    seed: int = 0, *, dev_fraction: float = 0.1, test_fraction: float = 0.1, adjectives_per_frame: int = 1
) -> dict[str, list[dict]]:
    """``{"train", "dev", "test"}`` rows ``{"sentence", "label"}``. Same seed, same rows, everywhere."""
    train_frames, dev_frames, test_frames = _split_frames(seed, dev_fraction, test_fraction)
    rng = random.Random(seed + 1)
    return {
        "train": _rows(train_frames, adjectives_per_frame, rng),
        "dev": _rows(dev_frames, adjectives_per_frame, rng),
        "test": _rows(test_frames, adjectives_per_frame, rng),
    }


SENTIMENT = Task(
    name="synthetic_sentiment",
    description="generated movie-review sentiment (the default job; SST-2's prompt)",
    columns=("sentence", "label"),
    template=PROMPT,
    label_words=LABEL_WORDS,
    generate=generate_sentiment,
    vocabulary=_vocabulary(),
)
