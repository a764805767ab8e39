"""What a ZO step is measured against: two plain forwards (its floor), and MeZO's own step pattern."""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["two_forwards", "mezo_reference_step"]


def two_forwards(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> Callable[[], None]:
    """L+ and L- without ZO: two forwards with the loss under ``inference_mode`` (call ``model.eval()`` first)."""

    def step() -> None:
        with torch.inference_mode():
            model(**batch)
            model(**batch)

    return step


def mezo_reference_step(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], eps: float = 1e-3, lr: float = 1e-7
) -> Callable[[], None]:
    """MeZO's trainer pattern: per tensor ``torch.normal`` + ``add_`` to +eps, forward, -2 eps, forward,
    +eps to restore, the projected gradient read with ``.item()``, then the update with z drawn again
    (no weight decay). The model's weights walk a little at each call, as in training."""
    params = [p for p in model.parameters() if p.requires_grad]
    seeds = iter(range(1, 1 << 62))

    def perturb(seed: int, scale: float) -> None:
        torch.manual_seed(seed)
        for p in params:
            z = torch.normal(mean=0.0, std=1.0, size=p.shape, device=p.device, dtype=p.dtype)
            p.data.add_(z, alpha=scale)

    @torch.no_grad()
    def step() -> None:
        seed = next(seeds)
        perturb(seed, eps)
        with torch.inference_mode():
            loss_plus = model(**batch).loss
        perturb(seed, -2 * eps)
        with torch.inference_mode():
            loss_minus = model(**batch).loss
        perturb(seed, eps)
        g = ((loss_plus - loss_minus) / (2 * eps)).item()
        perturb(seed, -lr * g)

    return step
