"""Helpers for the task tests: rows in each task's hub layout, an in-process tokenizer, tiny model
configs. (A plain module, not conftest, so test files can import it by a unique name.)"""

from __future__ import annotations

import json
import os
from pathlib import Path

# Tests never touch the network: everything is written locally.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

WORDS = "cat dog bird fish tree river stone cloud apple bread music paper window garden table city".split()
ARCH_NAMES = ("opt", "llama", "qwen2", "gpt2")


def _w(i: int, k: int = 0) -> str:
    return WORDS[(i * 7 + k * 3) % len(WORDS)]


def _sentence(i: int, n: int = 5) -> str:
    return " ".join(_w(i, k) for k in range(n))


def _row(task: str, i: int) -> dict:
    """Row i of a task, with the columns of its hub dataset."""
    s = _sentence(i)
    if task == "sst2":
        return {"sentence": f"the {s} film ", "label": i % 2, "idx": i}
    if task in ("rte", "cb"):
        return {
            "premise": f"The {s}.",
            "hypothesis": f"a {_w(i, 1)} is here",
            "label": i % (3 if task == "cb" else 2),
            "idx": i,
        }
    if task == "boolq":
        return {"question": f"is the {_w(i)} red", "answer": bool(i % 2), "passage": f"The {s}."}
    if task == "wsc":
        return {
            "text": f"The {_w(i)} saw the {_w(i, 2)} because It was near.",
            "span1_index": 1,
            "span2_index": 7,
            "span1_text": f"the {_w(i)}",
            "span2_text": "It",
            "label": i % 2,
            "idx": i,
        }
    if task == "wic":
        return {
            "word": _w(i),
            "sentence1": f"The {_w(i)} sat.",
            "sentence2": f"A {_w(i)} ran.",
            "start1": 4,
            "end1": 7,
            "start2": 2,
            "end2": 5,
            "label": i % 2,
            "idx": i,
        }
    if task == "multirc":
        return {
            "paragraph": f"The {s}.",
            "question": f"Where is the {_w(i)}?",
            "answer": f"near the {_w(i, 3)}",
            "idx": {"paragraph": 0, "question": i, "answer": 0},
            "label": i % 2,
        }
    if task == "copa":
        return {
            "premise": f"The {_w(i)} fell.",
            "choice1": f"The {_w(i, 1)} broke.",
            "choice2": f"I saw the {_w(i, 2)}.",
            "question": "effect" if i % 2 else "cause",
            "label": i % 2,
            "idx": i,
        }
    if task == "record":
        entities = [_w(i, 1).title(), _w(i, 2).title(), _w(i, 3).title()]
        return {
            "passage": f"The {s} story.\n@highlight\n{entities[0]} met {entities[1]}\n@highlight\n{entities[2]} left",
            "query": "@placeholder went home",
            "entities": entities,
            "entity_spans": {"text": entities},
            "answers": [entities[i % 3]],
            "idx": {"passage": i, "query": i},
        }
    if task == "squad":
        return {
            "id": str(i),
            "title": _w(i).title(),
            "context": f"The {s} is in the {_w(i, 4)}.",
            "question": f"Where is the {_w(i)}? ",
            "answers": {"text": [f"the {_w(i, 4)}", _w(i, 4)], "answer_start": [0, 0]},
        }
    if task == "drop":
        return {
            "section_id": "s",
            "query_id": str(i),
            "passage": f"The {s} scored {i + 2} points.",
            "question": f"How many points did the {_w(i)} score?",
            "answers_spans": {"spans": [str(i + 2)], "types": ["number"]},
        }
    raise KeyError(task)


TASK_NAMES = ("sst2", "rte", "cb", "boolq", "wsc", "wic", "multirc", "copa", "record", "squad", "drop")


def task_rows(task: str, split: str) -> list[dict]:
    start, count = (0, 8) if split == "train" else (100, 4)
    return [_row(task, start + i) for i in range(count)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _corpus() -> list[str]:
    from zo2_ds.tasks import get_task

    texts = []
    for name in TASK_NAMES:
        task = get_task(name)
        for split in ("train", "validation"):
            for row in task_rows(name, split):
                fields = task.fields(row)
                texts.append(task.template.format(**fields))
                texts.extend(str(v) for v in fields.values() if isinstance(v, str))
                texts.extend(str(v) for v in fields.get("continuations", []) + fields.get("choices", []))
    words = ["terrible", "great", "Yes", "No", "Maybe"]
    texts += [f"It was {w}\n{w}\n" for w in words] * 20 + [f" {w} " for w in words] * 20
    return texts


def build_tokenizer(add_bos: bool = True):
    """A byte-level BPE (GPT-2 style) trained on the test text, wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=700,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer)
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def tiny_config(arch: str, vocab_size: int):
    import transformers

    common = dict(vocab_size=vocab_size, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if arch == "opt":
        return transformers.OPTConfig(
            hidden_size=16,
            num_hidden_layers=2,
            ffn_dim=32,
            num_attention_heads=2,
            word_embed_proj_dim=16,
            max_position_embeddings=512,
            **common,
        )
    if arch == "llama":
        return transformers.LlamaConfig(
            hidden_size=16,
            num_hidden_layers=2,
            intermediate_size=32,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=512,
            **common,
        )
    if arch == "qwen2":
        return transformers.Qwen2Config(
            hidden_size=16,
            num_hidden_layers=2,
            intermediate_size=32,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=512,
            **common,
        )
    if arch == "gpt2":
        return transformers.GPT2Config(n_embd=16, n_layer=2, n_head=2, n_positions=512, **common)
    raise KeyError(arch)
