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
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, float]:
    """Evaluate this rank's shard; with ``distributed`` the confusion matrices (and the loss sums)
    are all-reduced, in one collective. ``loss_fn`` adds ``loss``: the mean over samples."""
    was_training = model.training
    model.eval()
    cm = torch.zeros(num_classes, num_classes, dtype=torch.long, device=device)
    loss_acc = torch.zeros(2, dtype=torch.float64, device=device)  # [sum of per-row losses, rows]
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
        if loss_fn is not None:
            rows = x.shape[0]  # the loss is a mean over the batch (or its tokens): weigh by rows
            loss_acc += torch.stack([loss_fn(out, y).double() * rows, loss_acc.new_tensor(rows)])
    if distributed:
        # counts are exact in float64 far beyond any evaluation set
        both = torch.cat([cm.reshape(-1).double(), loss_acc])
        dist.all_reduce(both)
        cm, loss_acc = both[:-2].round().long().reshape(num_classes, num_classes), both[-2:]
    model.train(was_training)
    res = scores(cm.cpu())
    total, rows = loss_acc.tolist()
    if loss_fn is not None and rows:
        res["loss"] = total / rows
    return res
