"""Block discovery: the repeated decoder layers of any HF model, wrapped or not; errors that name the key."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from zo2_ds.models import find_blocks
from zo2_ds.testing import TINY_ARCHS, tiny_causal_lm

EXPECTED_PATH = {
    "opt": "model.decoder.layers",
    "gpt2": "transformer.h",
    "llama": "model.layers",
    "qwen2": "model.layers",
    "mistral": "model.layers",
}


@pytest.mark.parametrize("arch", TINY_ARCHS)
@pytest.mark.parametrize("tied", [True, False])
def test_finds_decoder_layers_of_causal_lms(arch, tied):
    model = tiny_causal_lm(arch, tied=tied, layers=3)
    found = find_blocks(model)
    assert found.path == EXPECTED_PATH[arch]
    assert len(found.blocks) == 3
    assert found.blocks[0] is model.get_submodule(EXPECTED_PATH[arch])[0]
    # Embeddings and head are never inside a block.
    inside = {id(p) for b in found.blocks for p in b.parameters()}
    assert id(model.get_input_embeddings().weight) not in inside
    assert id(model.get_output_embeddings().weight) not in inside


@pytest.mark.parametrize("arch", ["opt", "gpt2", "llama", "qwen2"])
def test_finds_blocks_of_sequence_classifiers(arch):
    import transformers as tf

    lm = tiny_causal_lm(arch)
    cls = {
        "opt": tf.OPTForSequenceClassification,
        "gpt2": tf.GPT2ForSequenceClassification,
        "llama": tf.LlamaForSequenceClassification,
        "qwen2": tf.Qwen2ForSequenceClassification,
    }[arch]
    model = cls(lm.config)
    assert find_blocks(model).path == {"opt": "model.decoder.layers", "gpt2": "transformer.h"}.get(arch, "model.layers")


def test_finds_blocks_inside_a_task_wrapper_and_a_peft_model():
    class Wrapper(nn.Module):
        def __init__(self, lm):
            super().__init__()
            self.head_scale = nn.ModuleList([nn.Linear(2, 2)])  # a small decoy ModuleList
            self.lm = lm

        def forward(self, **kw):
            return self.lm(**kw)

    assert find_blocks(Wrapper(tiny_causal_lm("llama"))).path == "lm.model.layers"

    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_causal_lm("opt"), peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    found = find_blocks(model)
    assert found.path.endswith("model.decoder.layers") and len(found.blocks) == 2


def test_blocks_attr_overrides_and_bad_paths_name_the_key():
    model = tiny_causal_lm("opt", layers=2)
    assert find_blocks(model, "model.decoder.layers").path == "model.decoder.layers"
    with pytest.raises(ValueError, match=r"zo2\.offload\.blocks_attr='model\.nope'.*model\.decoder\.layers"):
        find_blocks(model, "model.nope")
    with pytest.raises(ValueError, match=r"zo2\.offload\.blocks_attr='model\.decoder\.embed_tokens' is a Embedding"):
        find_blocks(model, "model.decoder.embed_tokens")


def test_model_without_block_list_names_the_key():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 1))
    with pytest.raises(ValueError, match=r"zo2\.offload\.blocks_attr"):
        find_blocks(model)


def test_blocks_sharing_weights_are_refused():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            layer = nn.Linear(4, 4)
            self.layers = nn.ModuleList([layer, layer])

    with pytest.raises(ValueError, match="share a parameter"):
        find_blocks(Shared())

    class Leaky(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)])
            self.head = nn.Linear(4, 4)
            self.head.weight = self.layers[0].weight

    with pytest.raises(ValueError, match="also used outside the blocks"):
        find_blocks(Leaky())
    assert torch.is_tensor(Leaky().head.weight)
