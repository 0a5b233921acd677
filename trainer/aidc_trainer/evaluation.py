"""Held-out evaluation: accuracy and macro-F1 from a confusion matrix summed over ranks (exact)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from aidc_trainer.data import Split


def confusion(preds: torch.Tensor, targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    idx = targets.reshape(-1).long() * num_classes + preds.reshape(-1).long()
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def scores(cm: torch.Tensor) -> dict[str, float]:
    """accuracy and macro-F1 (mean over classes present in targets or predictions, as sklearn)."""
    cm = cm.double()
    tp = cm.diag()
    support, predicted = cm.sum(1), cm.sum(0)
    total = cm.sum()
    denom = support + predicted
    present = denom > 0
    f1 = torch.where(present, 2 * tp / denom.clamp(min=1), torch.zeros_like(tp))
    return {
        "accuracy": float(tp.sum() / total) if total > 0 else 0.0,
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "samples": int(total),
    }


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    split: Split,
    num_classes: int,
    device: torch.device,
    batch_size: int,
    predict: Callable[[torch.Tensor], torch.Tensor] | None = None,
    autocast: Callable[[], object] | None = None,
    distributed: bool = False,
) -> dict[str, float]:
    """Evaluate this rank's shard; with ``distributed`` the confusion matrices are all-reduced."""
    was_training = model.training
    model.eval()
    cm = torch.zeros(num_classes, num_classes, dtype=torch.long, device=device)
    for i in range(0, len(split), batch_size):
        x = split.inputs[i : i + batch_size].to(device)
        y = split.targets[i : i + batch_size].to(device)
        if autocast is not None:
            with autocast():  # type: ignore[attr-defined]
                out = model(x)
        else:
            out = model(x)
        p = predict(out) if predict is not None else out.argmax(-1)
        cm += confusion(p, y, num_classes)
    if distributed:
        dist.all_reduce(cm)
    model.train(was_training)
    return scores(cm.cpu())
