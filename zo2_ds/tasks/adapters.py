"""LoRA and prefix tuning through ``peft`` (the optional extra ``zo2_ds[peft]``).

After either call only the adapter's parameters have ``requires_grad=True``, and the ZO engine
perturbs and updates only those; the base weights stay bit-identical. ``save_adapter`` writes the
adapter alone in PEFT format (``adapter_config.json`` + ``adapter_model.safetensors``), which
``peft.PeftModel.from_pretrained(base_model, path)`` loads back.

MeZO's settings (``MEZO_ADAPTER_DEFAULTS``): LoRA r=8, alpha=16 on the attention query/value
projections (peft's per-architecture default targets), lr 1e-4 and eps 1e-2; prefix tuning with 5
virtual tokens, no reparameterisation, initialised from the keys/values the model itself computes
for 5 random tokens (MeZO's ``--prefix_init_by_real_act``), lr 1e-2 and eps 1e-1.
"""

from __future__ import annotations

import os

import torch
from torch import nn

__all__ = ["MEZO_ADAPTER_DEFAULTS", "apply_lora", "apply_prefix_tuning", "save_adapter", "trainable_parameter_names"]

MEZO_ADAPTER_DEFAULTS: dict[str, dict[str, float]] = {
    "lora": {"r": 8, "alpha": 16, "lr": 1e-4, "eps": 1e-2},
    "prefix": {"num_virtual_tokens": 5, "lr": 1e-2, "eps": 1e-1},
}


def _peft():
    try:
        import peft
    except ImportError as err:  # pragma: no cover - exercised only without the extra
        raise ImportError("LoRA and prefix tuning need peft: pip install 'zo2_ds[peft]'") from err
    return peft


def apply_lora(
    model: nn.Module,
    *,
    r: int = 8,
    alpha: int = 16,
    dropout: float = 0.0,
    target_modules: list[str] | str | None = None,
) -> nn.Module:
    """Wrap ``model`` in a peft LoRA model; only the LoRA A/B matrices stay trainable.

    ``target_modules=None`` uses peft's default for the architecture (q_proj/v_proj for OPT,
    Llama, Qwen2; c_attn for GPT-2), which matches MeZO's LoRA on OPT.
    """
    peft = _peft()
    config = peft.LoraConfig(
        task_type=peft.TaskType.CAUSAL_LM, r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules
    )
    return peft.get_peft_model(model, config)


@torch.no_grad()
def _init_prefix_from_activations(peft_model: nn.Module, num_virtual_tokens: int, seed: int) -> None:
    """Set the prefix to the keys/values the base model computes for random tokens.

    peft lays the prefix embedding out as [tokens, layers * 2 * kv_heads * head_dim] with, per
    layer, the key then the value; the model's cache holds [1, kv_heads, tokens, head_dim] each.
    """
    base = peft_model.get_base_model()
    embedding = peft_model.prompt_encoder[peft_model.active_adapter].embedding
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, base.config.vocab_size, (1, num_virtual_tokens), generator=gen)
    device = next(base.parameters()).device
    cache = base(input_ids=tokens.to(device), use_cache=True).past_key_values
    per_layer = []
    for layer in cache.layers:
        for kv in (layer.keys, layer.values):
            per_layer.append(kv[0].transpose(0, 1).reshape(num_virtual_tokens, -1))  # [tokens, heads * dim]
    prefix = torch.cat(per_layer, dim=-1)
    if prefix.shape != embedding.weight.shape:
        raise ValueError(
            f"prefix from activations has shape {tuple(prefix.shape)}, peft expects {tuple(embedding.weight.shape)}"
        )
    embedding.weight.copy_(prefix.to(embedding.weight.dtype))


def apply_prefix_tuning(
    model: nn.Module, *, num_virtual_tokens: int = 5, init_from_activations: bool = True, seed: int = 0
) -> nn.Module:
    """Wrap ``model`` in a peft prefix-tuning model (no reparameterisation MLP); only the prefix
    embedding stays trainable. ``init_from_activations`` starts it from the model's own
    keys/values for ``num_virtual_tokens`` random tokens drawn with ``seed`` (as MeZO does);
    otherwise peft's random init."""
    peft = _peft()
    config = peft.PrefixTuningConfig(
        task_type=peft.TaskType.CAUSAL_LM, num_virtual_tokens=num_virtual_tokens, prefix_projection=False
    )
    peft_model = peft.get_peft_model(model, config)
    if init_from_activations:
        _init_prefix_from_activations(peft_model, num_virtual_tokens, seed)
    return peft_model


def save_adapter(model: nn.Module, path: str | os.PathLike, state_dict: dict | None = None) -> None:
    """Write only the adapter, in PEFT format, to the folder ``path`` (from ``state_dict``, the peft model's
    own, when given)."""
    if not hasattr(model, "peft_config"):
        raise TypeError("save_adapter needs a peft model (from apply_lora / apply_prefix_tuning)")
    if state_dict is None:
        model.save_pretrained(os.fspath(path))
    else:
        model.save_pretrained(os.fspath(path), state_dict=state_dict)


def trainable_parameter_names(model: nn.Module) -> list[str]:
    """Names of the parameters the ZO engine will perturb (``requires_grad=True``)."""
    return [name for name, p in model.named_parameters() if p.requires_grad]
