"""How one active row moves in a sparse step: ``sgd_rows``, and the knobs that choose it.

Sparse SGD (``step_``): only the rows of the step's active set move, ``g = grad + wd * w``,
then by ``row_momentum``:

- ``"lazy"``: ``v = mu * v + g;  w -= lr * v`` — what ``torch.optim.SGD(momentum=mu,
  dampening=0, weight_decay=wd)`` does to those rows. Rows not active get nothing that step
  (no decay, no momentum movement): skipped, not deferred, the per-row parameter-server
  semantics of the original HF-Softmax. A row that comes back every few hundred steps thus
  receives its momentum tail only at its next activations, hundreds of steps late.
- ``"immediate"``: ``w -= lr / (1 - mu) * g`` — the whole tail ``lr * g * (1 + mu + mu^2 +
  ...)`` that momentum SGD would move the row over the next steps, at once; no momentum is
  kept between a row's activations (``torch.optim.SGD(lr=lr / (1 - mu), momentum=0)``).

``row_norm`` r (cosine heads only, whose logits ignore the norm): the rows start at norm r
and every updated row is rescaled to norm r. The norm of a row sets its angular learning rate
(a cosine head's gradient is orthogonal to the row and scales with 1 / ||w||, so a step turns
the row by ~ lr * |grad| / ||w||^2); rows left free grow several-fold under the large
gradients of hard negatives and then barely turn (docs/bench/hangul_notes.md).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

ROW_MOMENTUM = ("lazy", "immediate")
# row_norm "auto": the norm at which one sample's full pull (s * (1 - p) = s, orthogonal to the
# row) turns a row by AUTO_TURN radians at the peak learning rate, lr / (1 - mu) in all (the
# momentum tail included): r = sqrt(lr / (1 - mu) * s / (B * AUTO_TURN)). 0.625 gives r = 0.5
# on the Hangul benchmark (lr 0.1, mu 0.9, s 20, B 128), the norm its full softmax's free rows
# settle at (0.54) and the setting measured there.
AUTO_TURN = 0.625


def check_row_momentum(value: str) -> str:
    if value not in ROW_MOMENTUM:
        raise ValueError(f"classifier.row_momentum must be one of {ROW_MOMENTUM}, got {value!r}")
    return str(value)


def tail_lr(lr: float, mu: float) -> float:
    """How far momentum SGD moves a weight per unit of one gradient over all the following
    steps: lr * (1 + mu + mu^2 + ...) = lr / (1 - mu) (lr itself without momentum)."""
    return lr / (1.0 - mu) if mu < 1.0 else lr


def auto_row_norm(scale: float, lr: float, momentum: float, batch: int) -> float:
    """``row_norm: auto`` for a cosine head of ``scale`` trained at peak ``lr`` with
    ``momentum`` on batches of ``batch`` (per process): see ``AUTO_TURN``."""
    return math.sqrt(tail_lr(lr, momentum) * scale / (max(int(batch), 1) * AUTO_TURN))


def resolve_row_norm(
    value: float | str | None, metric: str, auto: Callable[[], float] | None = None
) -> float | None:
    """``classifier.row_norm`` for a head of ``metric`` -> r > 0 or None (rows free).

    "auto": ``auto()`` with a cosine head (``auto_row_norm`` of the run's settings), None
    with a linear one; a number needs a cosine head (a linear head's logits scale with the
    row norm)."""
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
        return None
    if isinstance(value, str) and value == "auto":
        if metric != "cosine":
            return None
        if auto is None:
            raise ValueError(
                "classifier.row_norm = auto needs the run's lr, momentum, head scale and batch "
                "size (build_classifier resolves it); pass a number or None"
            )
        return float(auto())
    try:
        norm = float(value)
    except (TypeError, ValueError):
        raise ValueError(
            f"classifier.row_norm must be a number > 0, null or auto, got {value!r}"
        ) from None
    if not norm > 0:
        raise ValueError(f"classifier.row_norm must be > 0 (or null, auto), got {value!r}")
    if metric != "cosine":
        raise ValueError(
            f"classifier.row_norm = {value} needs a cosine head (cosface, arcface): the linear "
            f"head's logits scale with the row norm; use row_norm=null or auto"
        )
    return norm


def project_rows(w: torch.Tensor, norm: float) -> torch.Tensor:
    """w (M, D) rescaled so every row has L2 norm ``norm`` (zero rows stay zero)."""
    return w * (norm / w.norm(dim=1, keepdim=True).clamp_min(1e-12))


def sgd_rows(
    w: torch.Tensor,
    v: torch.Tensor | None,
    grad: torch.Tensor,
    lr: float,
    mu: float,
    weight_decay: float,
    row_norm: float | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One update of the rows w (M, D) (a copy, changed in place) with their momentum v (M, D)
    ("lazy") or None ("immediate") and their gradient (M, D) -> (new w, new v or None)."""
    g = grad.add(w, alpha=weight_decay) if weight_decay else grad
    if v is None:
        w.add_(g, alpha=-tail_lr(lr, mu))  # the whole tail at once
    else:
        v = v.mul_(mu).add_(g)
        w.add_(v, alpha=-lr)
    if row_norm is not None:
        w = project_rows(w, row_norm)
    return w, v
