"""Classification metrics on held-out data: accuracy, loss, per-class recall and support, the confusion matrix."""
from typing import Any

import torch
import torch.nn.functional as F


@torch.no_grad()
def predict_logits(model: torch.nn.Module, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    model.eval()
    return torch.cat([model(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])


@torch.no_grad()
def classification_report(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, classes: list[str]) -> dict[str, Any]:
    logits = predict_logits(model, x)
    loss = F.cross_entropy(logits, y).item()
    pred = logits.argmax(1)
    k = len(classes)
    confusion = torch.zeros(k, k, dtype=torch.long)
    confusion.index_put_((y.cpu(), pred.cpu()), torch.ones(len(y), dtype=torch.long), accumulate=True)
    support = confusion.sum(1)
    recall = {classes[i]: (confusion[i, i].item() / support[i].item()) if support[i] else None for i in range(k)}
    return {"accuracy": (pred == y).float().mean().item(), "loss": loss,
            "per_class": {"recall": recall, "support": {classes[i]: int(support[i]) for i in range(k)},
                          "false_negatives": {classes[i]: int(support[i] - confusion[i, i]) for i in range(k)}},
            "confusion_matrix": confusion.tolist()}
