"""The training objectives as modules around an HF causal LM, and the scoring they share.

Each module keeps the model as its submodule ``model`` (so the engine sees ``model.<name>``
parameters) and its forward takes exactly the keys of the matching collate function and returns
a scalar fp32 loss. Forwards only read their inputs and the model: nothing is cached or counted
between calls, and they run unchanged under ``torch.no_grad``. They do not switch train/eval
mode: ZO training wants dropout off (MeZO calls ``model.eval()``), which is the caller's choice.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from zo2_ds.tasks.metrics import f1_score

__all__ = ["CandidateCrossEntropy", "AnswerLM", "NegativeF1", "candidate_token_log_probs", "greedy_decode"]


@functools.lru_cache(maxsize=64)
def _forward_accepts(cls: type, name: str) -> bool:
    params = inspect.signature(cls.forward).parameters
    return name in params


def _base_model(model: nn.Module) -> nn.Module:
    get_base = getattr(model, "get_base_model", None)  # a peft model forwards its kwargs to this one
    return get_base() if callable(get_base) else model


def _answer_logits(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, num_keep: int):
    """The logits of the last ``num_keep`` positions, [R, num_keep, V] (see candidate_token_log_probs)."""
    kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
    base_cls = type(_base_model(model))
    if _forward_accepts(base_cls, "position_ids"):
        kwargs["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp_(min=0)
    if _forward_accepts(base_cls, "logits_to_keep"):
        kwargs["logits_to_keep"] = num_keep
    if _forward_accepts(base_cls, "use_cache") and not _is_prompt_learning(model):
        kwargs["use_cache"] = False  # no KV cache to build (a prefix model's cache holds its prefix)
    return model(**kwargs).logits[:, -num_keep:, :]


def candidate_token_log_probs(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    cand_row: torch.Tensor,
    cand_tokens: torch.Tensor,
) -> torch.Tensor:
    """log p(token) of every candidate token, [B, C, L] fp32 (see ``collate_candidates``).

    Position ids come from the attention mask, so a left-padded row scores exactly as it would
    alone (GPT-2's learned positions need this; OPT does it itself; RoPE models are unaffected).
    Only the last L positions' logits are asked for (``logits_to_keep``) where the model allows.
    """
    num_keep = cand_tokens.shape[-1]
    logits = _answer_logits(model, input_ids, attention_mask, num_keep)  # [R, L, V]
    log_norm = torch.logsumexp(logits.float(), dim=-1)  # [R, L]
    rows = cand_row.unsqueeze(-1).expand_as(cand_tokens)
    positions = torch.arange(num_keep, device=cand_tokens.device).expand_as(cand_tokens)
    return logits[rows, positions, cand_tokens].float() - log_norm[rows, positions]


def candidate_scores(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    cand_row: torch.Tensor,
    cand_tokens: torch.Tensor,
    cand_token_mask: torch.Tensor,
    cand_mask: torch.Tensor,
) -> torch.Tensor:
    """Mean log-probability of each candidate's tokens, [B, C]; -inf for padding candidates."""
    if cand_tokens.shape[-1] == 1:
        # Single-token candidates (label words): the mean is the token's own log-probability. The same
        # values as below, in fewer operations: this runs twice per ZO step.
        last = _answer_logits(model, input_ids, attention_mask, 1)[:, 0].float()  # [R, V]
        scores = last[cand_row, cand_tokens[..., 0]] - torch.logsumexp(last, dim=-1)[cand_row]
        return scores.masked_fill(~cand_mask, float("-inf"))
    token_lp = candidate_token_log_probs(model, input_ids, attention_mask, cand_row, cand_tokens)
    mask = cand_token_mask.to(token_lp.dtype)
    scores = (token_lp * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
    return scores.masked_fill(~cand_mask, float("-inf"))


class CandidateCrossEntropy(nn.Module):
    """Cross-entropy over the candidates' mean log-probabilities (MeZO ``train_as_classification``)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, cand_row, cand_tokens, cand_token_mask, cand_mask, labels):
        if cand_tokens.shape[-1] == 1 and input_ids.shape[0] == cand_row.shape[0]:
            # Label words: one row per example (as many rows as examples) and one token per candidate, so
            # an example's candidates share one log-normaliser, which cancels in the cross-entropy: the
            # loss over the raw logits is the same value, without the normaliser (it runs twice per step).
            last = _answer_logits(self.model, input_ids, attention_mask, 1)[:, 0]  # [B, V]
            logits = last[cand_row, cand_tokens[..., 0]].float()  # row b is example b
            return F.cross_entropy(logits.masked_fill(~cand_mask, float("-inf")), labels)
        scores = candidate_scores(
            self.model, input_ids, attention_mask, cand_row, cand_tokens, cand_token_mask, cand_mask
        )
        return F.cross_entropy(scores, labels)


class AnswerLM(nn.Module):
    """LM loss on the gold answer's tokens only, averaged over all of the batch's answer tokens
    (MeZO ``only_train_option``). Takes ``collate_candidates(..., target_only=True)``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, cand_row, cand_tokens, cand_token_mask, cand_mask, labels):
        token_lp = candidate_token_log_probs(self.model, input_ids, attention_mask, cand_row, cand_tokens)
        mask = (cand_token_mask & cand_mask.unsqueeze(-1)).to(token_lp.dtype)
        return -(token_lp * mask).sum() / mask.sum().clamp(min=1.0)


def _is_prompt_learning(model: nn.Module) -> bool:
    return bool(getattr(getattr(model, "active_peft_config", None), "is_prompt_learning", False))


def _greedy_tokens_uncached(model, input_ids, attention_mask, *, max_new_tokens, stop_ids, pad_id) -> torch.Tensor:
    """Greedy decoding by full forwards (no KV cache): slower, but it needs nothing from the model
    beyond the forward the scoring uses. For peft prefix tuning, whose ``generate`` (peft 0.21 with
    transformers 5.24) does not decode as a real prefix would: it loses the prefix when the
    generation cache takes over (tests/tasks/test_task_adapters.py shows it)."""
    base_cls = type(_base_model(model))
    stops = torch.tensor(list(stop_ids), dtype=input_ids.dtype, device=input_ids.device)
    ids, mask = input_ids, attention_mask.long()
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    new_tokens = []
    for _ in range(max_new_tokens):
        kwargs = {"input_ids": ids, "attention_mask": mask}
        if _forward_accepts(base_cls, "position_ids"):
            kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp_(min=0)
        if _forward_accepts(base_cls, "logits_to_keep"):
            kwargs["logits_to_keep"] = 1
        step = model(**kwargs).logits[:, -1].argmax(-1).masked_fill(done, pad_id)
        new_tokens.append(step)
        ids = torch.cat([ids, step[:, None]], dim=1)
        mask = torch.cat([mask, (~done).long()[:, None]], dim=1)
        done |= torch.isin(step, stops)
        if bool(done.all()):
            break
    return torch.stack(new_tokens, dim=1) if new_tokens else ids[:, :0]


@torch.no_grad()
def greedy_decode(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    tokenizer,
    *,
    max_new_tokens: int,
    stop_ids: Sequence[int],
    pad_id: int,
) -> list[str]:
    """Greedy continuations of left-padded prompts, up to the first stop token or newline, stripped."""
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if _is_prompt_learning(model):
        new_tokens = _greedy_tokens_uncached(
            model, input_ids, attention_mask, max_new_tokens=max_new_tokens, stop_ids=stop_ids, pad_id=pad_id
        )
    else:
        out = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            do_sample=False,
            num_beams=1,
            max_new_tokens=max_new_tokens,
            eos_token_id=list(stop_ids),
            pad_token_id=pad_id,
        )
        new_tokens = out[:, input_ids.shape[1] :]
    texts = []
    for row in new_tokens.tolist():
        cut = next((k for k, t in enumerate(row) if t in stop_ids), len(row))
        texts.append(tokenizer.decode(row[:cut], skip_special_tokens=True).split("\n")[0].strip())
    return texts


class NegativeF1(nn.Module):
    """-F1 of the greedy decode, averaged over the batch: a non-differentiable objective that the
    ZO step can use as its loss (MeZO ``non_diff`` on SQuAD). Takes ``collate_prompts``.

    ``answers`` maps an example's uid to its gold strings; it is fixed at construction.
    Decoding runs every block's forward once per new token: use it with the in-GPU (not the
    offloaded) engine path.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        answers: Mapping[int, Sequence[str]],
        *,
        max_new_tokens: int,
        stop_ids: Sequence[int],
        pad_id: int,
    ):
        super().__init__()
        self.model = model
        self._tokenizer = tokenizer
        self._answers = dict(answers)
        self._decode = functools.partial(
            greedy_decode, tokenizer=tokenizer, max_new_tokens=max_new_tokens, stop_ids=stop_ids, pad_id=pad_id
        )

    def forward(self, input_ids, attention_mask, uid):
        predictions = self._decode(self.model, input_ids, attention_mask)
        f1 = [f1_score(p, self._answers[int(u)]) for p, u in zip(predictions, uid.tolist())]
        return torch.tensor(-sum(f1) / len(f1), dtype=torch.float32, device=input_ids.device)
