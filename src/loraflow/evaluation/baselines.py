"""Static-weight baselines on the same fused engine: Avg fusion and LoRAHub.

LoRAHub (Huang et al., 2023) finds one scalar weight per LoRA by gradient-free search on the
few-shot set. As in its reference: nevergrad's NGOpt, 40 evaluations, weights starting at 0 and
bounded to [-1.5, 1.5], minimising loss + 0.05 * mean(|w|). Unlike the reference, which mixes the
A and B matrices separately (impossible for LoRAs of different ranks), we weight each LoRA's
output, which is the exact form.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from loraflow.common.checks import check_float, check_int, check_positive
from loraflow.common.errors import LoraFlowError
from loraflow.common.extras import require


def average_weights(k: int) -> list[float]:
    """Avg fusion: equal static weights 1/k."""
    return [1.0 / k] * k


@dataclass
class LoraHubResult:
    weights: list[float]
    objective: float
    loss: float
    history: list[dict] = field(default_factory=list)


def lorahub_search(
    loss_fn: Callable[[list[float]], float],
    k: int,
    *,
    budget: int = 40,
    bound: float = 1.5,
    l1: float = 0.05,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
) -> LoraHubResult:
    """Minimise loss_fn(w) + l1 * mean(|w|) over w in [-bound, bound]^k with nevergrad NGOpt.

    Args:
        loss_fn: maps k static weights to the few-shot loss.
        budget: number of loss evaluations (LoRAHub: 40).
        progress: called after each evaluation with its index.
    """
    ng = require("nevergrad", what="the LoRAHub baseline")
    try:
        check_int("k", k, low=1)
        check_int("lorahub_budget", budget, low=1)
        bound = check_positive("lorahub_bound", bound)
        l1 = check_float("lorahub_l1", l1, low=0.0)
    except ValueError as e:
        raise LoraFlowError(str(e)) from None
    param = ng.p.Array(init=np.zeros(k), lower=-bound, upper=bound)
    param.random_state = np.random.RandomState(seed)
    optimizer = ng.optimizers.NGOpt(parametrization=param, budget=budget)
    history: list[dict] = []

    def objective(w: np.ndarray) -> float:
        weights = [float(x) for x in w]
        loss = float(loss_fn(weights))
        value = loss + l1 * float(np.mean(np.abs(w)))
        finite = bool(np.isfinite(value))
        # a diverging mix (NaN loss) is recorded as unknown and told to the optimizer as the worst value
        history.append({"weights": weights, "loss": loss if finite else None, "objective": value if finite else None})
        if progress is not None:
            progress(len(history))
        return value if finite else float("inf")

    recommendation = optimizer.minimize(objective)
    best = [float(x) for x in recommendation.value]
    # The recommendation was evaluated during the search; report its recorded loss.
    match = min(history, key=lambda h: float(np.abs(np.array(h["weights"]) - best).max()))
    return LoraHubResult(weights=best, objective=match["objective"], loss=match["loss"], history=history)


def fewshot_loss_fn(model, dataset: Sequence[dict], pad_id: int, batch_size: int = 8) -> Callable[[list[float]], float]:
    """loss(w): mean response-token loss of `model` with static weights w on `dataset`.

    Each candidate runs as a per-call fusion (`model.fusion`), which never merges into the base
    weights: a search of ~40 candidates costs no merge and restore of the whole model, and the
    model's default fusion (merged or not) is left as the caller set it.
    """
    import torch

    from loraflow.core.fusion_spec import FusionSpec
    from loraflow.data.formats import collate
    from loraflow.core.losses import response_token_count, summed_loss

    batches = [dataset[i:i + batch_size] for i in range(0, len(dataset), batch_size)]
    tokens = sum(response_token_count(x) for x in dataset)

    @torch.no_grad()
    def loss(weights: list[float]) -> float:
        model.eval()
        total = 0.0
        with model.fusion(FusionSpec("static", weights=tuple(float(w) for w in weights))):
            for items in batches:
                batch = {k: v.to(model.device) for k, v in collate(list(items), pad_id).items()}
                total += summed_loss(model, batch).item()
        return total / max(tokens, 1)

    return loss
