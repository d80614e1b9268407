"""Per-teacher call budgets: at most a set share of the rows goes to an expensive teacher.

A user who pays per call to a foundation model wants a bound ("the LM answers at most 10% of
rows"), not whatever share a gate happens to let through. A teacher URL carries it
(``local:checkpoints/lm?budget=0.1``, ``grpc://lm:50051?budget=0.1``); ``--budget`` gives every
teacher without its own the same one. Under a budget b, with batches of B rows, step t may send

    k_t = floor((t + 1) b B) - floor(t b B)

rows to the teacher: at most ceil(b B) in any batch, and over any stretch of steps from the start
never more than b of the rows (and within one row of exactly b). k_t is a function of the step
alone, so a resumed run sends what an uninterrupted one does. The bound holds at every step,
warm-up and exploration included: during warm-up the k_t rows are drawn uniformly, afterwards
by the method's rule (``budget_rows``), exploration taken out of the same k_t.
"""

from __future__ import annotations

import math

import torch

# budget rows are chosen: "top" (the largest scores), "sampled" (drawn with probability proportional
# to the scores, Gumbel-top-k) or "uniform" (drawn uniformly)
RULES = ("top", "sampled", "uniform")


def check_share(share: float, what: str) -> float:
    """``share`` as a float in (0, 1], or a ValueError naming ``what`` it belongs to."""
    try:
        value = float(share)
    except (TypeError, ValueError):
        raise ValueError(f"{what}: budget must be a number in (0, 1], not {share!r}") from None
    if not 0.0 < value <= 1.0:
        raise ValueError(f"{what}: budget must be in (0, 1] (the share of each batch's rows the teacher may answer), "
                         f"not {share!r}")
    return value


def rows_allowed(share: float, batch: int, step: int) -> int:
    """k_t: how many of step ``step``'s ``batch`` rows a teacher with budget ``share`` may answer."""
    def total(steps: int) -> int:  # rows allowed over the first ``steps`` steps; the rounding keeps 0.1 * 640 = 64
        return math.floor(round(steps * share * batch, 9))
    return min(batch, total(step + 1) - total(step))


def top_rows(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean [B]: the ``k`` rows with the largest ``scores``."""
    chosen = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    if k:
        chosen[scores.topk(min(k, len(scores))).indices] = True
    return chosen


def gumbel(shape: torch.Size, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    uniform = torch.rand(shape, generator=generator).to(device)
    return -torch.log(-torch.log(uniform.clamp(1e-12, 1.0 - 1e-7)))


def sample_rows(scores: torch.Tensor, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Boolean [B]: ``k`` rows drawn without replacement with probability proportional to ``scores``
    (Gumbel-top-k: the top rows of log score + Gumbel noise). Unlike ``top_rows`` every row with a
    score > 0 has a chance, so over the epochs a fixed w still spreads the rows over the training set."""
    return top_rows(scores.clamp_min(1e-12).log() + gumbel(scores.shape, generator, scores.device), k)


def budget_rows(scores: torch.Tensor, k: int, rule: str, explore: float = 0.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Boolean [B]: the ``k`` rows a budgeted teacher answers. Each of the k slots is, with probability
    ``explore``, given to a row drawn uniformly from those the rule did not pick (so the importance
    weights keep seeing rows they rank low); the rest go by ``rule`` (``RULES``) on ``scores``."""
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, not {rule!r}")
    k = min(k, len(scores))
    explored = int((torch.rand(k, generator=generator) < explore).sum()) if explore > 0 and k else 0
    picked = k - explored
    if rule == "top":
        chosen = top_rows(scores, picked)
    elif rule == "sampled":
        chosen = sample_rows(scores, picked, generator)
    else:
        chosen = top_rows(gumbel(scores.shape, generator, scores.device), picked)
    if explored:
        others = gumbel(scores.shape, generator, scores.device).masked_fill(chosen, -math.inf)
        chosen |= top_rows(others, explored)
    return chosen
