"""materialize: a model built block by block straight into its pinned homes equals a normal build, and the
offloaded engine adopts those homes and trains it exactly as a normally loaded model.

The config path is compared with transformers' own init (``initialize_weights`` then ``tie_weights``, as
``from_config`` runs them, with the same seed, on a normally built model). ``from_config`` itself cannot be
matched bit for bit: its constructors first draw torch's default init (``nn.Linear.reset_parameters``)
from the same generator, which a meta-device skeleton does not.
"""

from __future__ import annotations

import gc
import json
import mmap
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import zo2_ds
from zo2_ds.models import find_blocks
from zo2_ds.offload import hostmem
from zo2_ds.offload.materialize import host_bytes_needed, materialize
from zo2_ds.offload.store import block_layout
from zo2_ds.testing import ds_config, require_cuda, tiny_causal_lm

VOCAB = 96
CUDA = torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") == "cuda"
WORKER = Path(__file__).parent / "workers" / "materialize_rss_worker.py"


def transformers_init(config, dtype, seed, device="cpu"):
    """A normally built model, initialized again by transformers as from_config does: the head untied
    while the init runs, then tied."""
    from transformers import AutoModelForCausalLM

    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    for t in [*model.modules(), *model.parameters()]:
        if hasattr(t, "_is_hf_initialized"):
            del t._is_hf_initialized
    if config.tie_word_embeddings:
        model.lm_head.weight = torch.nn.Parameter(torch.empty_like(model.lm_head.weight))
    torch.manual_seed(seed)
    model.initialize_weights()
    model.tie_weights()
    return model


def assert_same_model(expected, got):
    """Parameters and buffers bit for bit (dtype included), the same tying and the same train/eval mode."""
    for what in ("named_parameters", "named_buffers"):
        a, b = dict(getattr(expected, what)()), dict(getattr(got, what)())
        assert a.keys() == b.keys(), what
        for name in a:
            assert a[name].dtype == b[name].dtype, name
            assert a[name].device == b[name].device, name
            assert torch.equal(a[name], b[name]), f"{name} differs"
    assert len(list(expected.parameters())) == len(list(got.parameters()))  # tied the same way
    assert expected.training == got.training


def blocks_of(model):
    return find_blocks(model).blocks


def assert_in_block_layout(model):
    """Every block's parameters are views of one flat buffer, at the block store's offsets."""
    for block in blocks_of(model):
        layout, size = block_layout(block)
        base = layout[0][0].data_ptr()
        storage = layout[0][0].untyped_storage()
        for p, offset, _ in layout:
            assert p.untyped_storage().data_ptr() == storage.data_ptr() and p.data_ptr() == base + offset
        assert base - storage.data_ptr() + size <= storage.nbytes()


@pytest.mark.parametrize(
    "arch,tied", [("opt", True), ("opt", False), ("llama", False), ("llama", True), ("gpt2", True), ("qwen2", False)]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_config_path_equals_transformers_init(arch, tied, dtype):
    config = tiny_causal_lm(arch, tied=tied, layers=3).config
    expected = transformers_init(config, dtype, seed=5)
    torch.manual_seed(5)
    got = materialize(config, dtype=dtype, device="cpu", progress=False)
    assert_same_model(expected, got)
    assert_in_block_layout(got)
    if arch == "opt":  # the tied head did not re-draw the embedding: its padding row is still zero
        assert not got.get_input_embeddings().weight[config.pad_token_id].any()


@pytest.mark.parametrize("arch,tied", [("opt", True), ("opt", False), ("llama", False), ("llama", True)])
@pytest.mark.parametrize("shards", ["single", "sharded"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_checkpoint_path_equals_from_pretrained(tmp_path, arch, tied, shards, dtype):
    from transformers import AutoModelForCausalLM

    tiny_causal_lm(arch, tied=tied, layers=3).save_pretrained(
        tmp_path, max_shard_size="5KB" if shards == "sharded" else "5GB"
    )
    assert (tmp_path / ("model.safetensors.index.json" if shards == "sharded" else "model.safetensors")).exists()
    got = materialize(tmp_path, dtype=dtype, device="cpu", progress=False)
    assert_same_model(AutoModelForCausalLM.from_pretrained(tmp_path, dtype=dtype), got)
    assert_in_block_layout(got)


def test_checkpoint_of_the_base_model_loads_without_its_prefix(tmp_path):
    from transformers import AutoModelForCausalLM

    tiny_causal_lm("opt", layers=2).model.save_pretrained(tmp_path)  # keys "decoder.*", as facebook/opt-*
    got = materialize(tmp_path, device="cpu", progress=False)
    assert_same_model(AutoModelForCausalLM.from_pretrained(tmp_path), got)


def test_bad_sources_are_explained(tmp_path):
    with pytest.raises(ValueError, match=r"neither model\.safetensors nor model\.safetensors\.index\.json"):
        materialize(tmp_path, device="cpu", progress=False)
    with pytest.raises(ValueError, match="not a folder"):
        materialize(tmp_path / "missing", device="cpu", progress=False)
    with pytest.raises(ValueError, match=r"dtype 'fp8' is not supported"):
        materialize(tiny_causal_lm("opt").config, dtype="fp8", device="cpu", progress=False)
    model = tiny_causal_lm("llama", tied=False, layers=2)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "intermediate_size": 40}))
    with pytest.raises(
        ValueError, match=r"mlp\.gate_proj\.weight .* has shape \(32, 16\), the model expects \(40, 16\)"
    ):
        materialize(tmp_path, device="cpu", progress=False)
    (tmp_path / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": False, "num_hidden_layers": 3}))
    with pytest.raises(ValueError, match=r"no tensor for model\.layers\.2\.self_attn\.q_proj\.weight"):
        materialize(tmp_path, device="cpu", progress=False)


def batches(num_steps, micro_batch=2, seq=12):
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, VOCAB, (micro_batch, seq), generator=gen) for _ in range(num_steps)]


def train(model, config, num_steps=3):
    engine, *_ = zo2_ds.initialize(model=model, config=config)
    engine.train()
    losses = []
    for ids in batches(num_steps):
        ids = ids.to(engine.device)
        out = engine(input_ids=ids, labels=ids)
        losses.append(out.loss.item())
        engine.backward(out.loss)
        engine.step()
    engine.zo_runner.flush()
    return engine, losses, {n: p.detach().to("cpu", copy=True) for n, p in engine.module.named_parameters()}


@pytest.mark.parametrize(
    "arch,tied,dtype,model_dtype,offload",
    [
        ("opt", True, "fp32", "fp32", {}),
        ("llama", False, "bf16", "bf16", {"write_back_interval": 2}),
        ("llama", True, "fp32", "fp32", {"num_resident_blocks": 1}),
        ("opt", False, "bf16", "fp32", {}),  # DeepSpeed casts the parameters: copied as usual, not adopted
    ],
)
def test_training_a_materialized_model_equals_a_loaded_one(tmp_path, arch, tied, dtype, model_dtype, offload):
    from transformers import AutoModelForCausalLM

    tiny_causal_lm(arch, tied=tied, layers=3).save_pretrained(tmp_path)
    config = ds_config(
        lr=2e-3,
        dtype=dtype,
        zo2={"eps": 1e-3, "seed": 11, "num_perturbations": 2, "offload": {"enabled": True, **offload}},
    )
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[model_dtype]
    model = materialize(tmp_path, dtype=torch_dtype, device="cpu", progress=False)
    firsts = [next(block.parameters()).data for block in blocks_of(model)]  # held: no address is reused
    engine, losses, params = train(model, config)
    store = engine.zo_offload_store
    for b, home in enumerate(store.homes):  # streamed blocks adopted as they were: no second copy
        assert (home.data_ptr() == firsts[b].data_ptr()) == (store.is_streamed(b) and dtype == model_dtype)
    _, losses_ref, params_ref = train(AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch_dtype), config)
    assert losses == losses_ref
    assert params.keys() == params_ref.keys()
    for name in params:
        assert torch.equal(params[name], params_ref[name]), name


def test_not_enough_host_memory_is_refused_before_pinning(tmp_path, monkeypatch):
    config = tiny_causal_lm("llama", tied=False, layers=4).config
    pinned = []
    monkeypatch.setattr(hostmem, "pinned_host_buffer", lambda *a: pinned.append(a) or pytest.fail("pinned"))
    monkeypatch.setattr(hostmem, "available_host_bytes", lambda: 1000)
    skeleton = tiny_causal_lm("llama", tied=False, layers=4)
    homes = sum(block_layout(b)[1] for b in skeleton.model.layers)
    needed = host_bytes_needed(skeleton, on_host=True)
    assert needed == homes + sum(p.numel() * 4 for n, p in skeleton.named_parameters() if ".layers." not in n)
    with pytest.raises(
        ValueError, match=rf"needs \d+\.\d\d GiB of host memory \({needed} bytes.*only 0\.00 GiB \(1000 bytes\)"
    ):
        materialize(config, device="cpu", progress=False)
    # A checkpoint adds its largest read (the tensor's mapped pages and its copy: the fp32 embedding here).
    skeleton.save_pretrained(tmp_path)
    transient = 2 * VOCAB * 16 * 4
    with pytest.raises(ValueError, match=rf"\({needed + transient} bytes"):
        materialize(tmp_path, device="cpu", progress=False)
    assert pinned == []
    monkeypatch.undo()
    monkeypatch.setattr(hostmem, "available_host_bytes", lambda: needed + transient)  # just enough
    materialize(tmp_path, device="cpu", progress=False)


class FakeAccelerator:
    """Records cudaHostRegister / cudaHostUnregister calls."""

    def __init__(self):
        self.registered: set[int] = set()
        self.unregistered: list[int] = []

    def register_host_memory(self, address, num_bytes):
        self.registered.add(address)
        return True

    def unregister_host_memory(self, address):
        self.unregistered.append(address)


def test_a_pinned_buffer_is_unregistered_with_its_memory_not_before():
    acc = FakeAccelerator()
    buf, pinned = hostmem.pinned_host_buffer(acc, 10_000)
    assert pinned and buf.numel() == 10_000 and buf.data_ptr() % 4096 == 0 and acc.registered == {buf.data_ptr()}
    address = buf.data_ptr()
    view = buf[512:1024].view(torch.float32)  # a parameter's slice outlives the buffer tensor
    del buf
    gc.collect()
    assert acc.unregistered == []
    view.fill_(1.0)
    del view
    gc.collect()
    assert acc.unregistered == [address]


def vm_flags_of(address: int) -> list[str]:
    """The VmFlags line of this process's mapping that holds ``address`` (/proc/self/smaps)."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                start, end = (int(x, 16) for x in head.split("-"))
                inside = start <= address < end
            elif inside and head == "VmFlags:":
                return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


def test_a_pinned_buffer_is_advised_to_use_huge_pages():
    """Page-locking 2 MiB pages is about twice as fast as 4 KiB ones (hostmem.pinned_host_buffer)."""
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not thp.exists() or "[never]" in thp.read_text():
        pytest.skip("this kernel offers no transparent huge pages")
    buf, pinned = hostmem.pinned_host_buffer(FakeAccelerator(), 8 << 20)
    assert pinned
    assert "hg" in vm_flags_of(buf.data_ptr())  # hg: MADV_HUGEPAGE was taken
    plain = mmap.mmap(-1, 8 << 20, flags=mmap.MAP_PRIVATE)  # the check can fail: a mapping without the advice
    plain_view = torch.frombuffer(plain, dtype=torch.uint8)
    assert "hg" not in vm_flags_of(plain_view.data_ptr())


def rss_of(source, dtype="fp32"):
    out = subprocess.run(
        [sys.executable, str(WORKER), str(source), dtype], capture_output=True, text=True, timeout=300, check=False
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_peak_host_rss_stays_near_the_model_bytes(tmp_path):
    """A ~350 MB fp32 model: from its config, and from a single-file checkpoint (the file memory-mapped)."""
    subprocess.run([sys.executable, str(WORKER), "--save", str(tmp_path)], check=True, timeout=300)
    for source in ("config", tmp_path):
        r = rss_of(source)
        assert r["peak_bytes"] - r["baseline_bytes"] <= 1.1 * r["model_bytes"], r


@require_cuda
def test_config_path_on_the_gpu_pins_the_homes_and_the_engine_adopts_them():
    assert CUDA, "run with DS_ACCELERATOR=cuda"
    config = tiny_causal_lm("llama", tied=False, layers=3).config
    expected = transformers_init(config, torch.float32, seed=5, device="cuda")
    torch.manual_seed(5)
    got = materialize(config, device="cuda", progress=False)
    for block in blocks_of(got):
        assert all(p.device.type == "cpu" and p.is_pinned() for p in block.parameters())
    got_params = {n: p.to("cuda") for n, p in got.named_parameters()}
    for name, p in expected.named_parameters():
        assert torch.equal(p, got_params[name]), name
    firsts = [next(block.parameters()).data for block in blocks_of(got)]  # held: no address is reused
    engine, *_ = zo2_ds.initialize(model=got, config=ds_config(zo2={"offload": {"enabled": True}}))
    store = engine.zo_offload_store
    assert [h.data_ptr() for h in store.homes] == [f.data_ptr() for f in firsts] and all(store.host_pinned)


@require_cuda
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_checkpoint_on_the_gpu_trains_as_a_loaded_model_from_adopted_pinned_homes(tmp_path, dtype):
    from transformers import AutoModelForCausalLM

    assert CUDA, "run with DS_ACCELERATOR=cuda"
    tiny_causal_lm("llama", tied=False, layers=4).save_pretrained(tmp_path, max_shard_size="20KB")
    config = ds_config(lr=2e-3, dtype=dtype, zo2={"eps": 1e-3, "seed": 3, "offload": {"enabled": True}})
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    model = materialize(tmp_path, dtype=torch_dtype, progress=False)  # the rest on the GPU by default
    assert model.lm_head.weight.is_cuda
    firsts = [next(block.parameters()).data for block in blocks_of(model)]  # held: no address is reused
    engine, losses, params = train(model, config)
    store = engine.zo_offload_store
    assert [h.data_ptr() for h in store.homes] == [f.data_ptr() for f in firsts] and all(store.host_pinned)
    _, losses_ref, params_ref = train(AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch_dtype), config)
    assert losses == losses_ref
    for name in params:
        assert torch.equal(params[name], params_ref[name]), name
