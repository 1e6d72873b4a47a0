"""Loss-threshold membership inference (Yeom et al., Privacy Risk in Machine Learning): the attacker calls a row a
training member when its loss is low. AUC of forget rows (members to find) against test rows (never trained on):
0.5 means the forget set looks like unseen data, as after a retrain."""
import numpy as np
from sklearn.metrics import roc_auc_score


def row_losses(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per-row cross-entropy. logits [n, C], labels [n]."""
    logits = np.asarray(logits, dtype=np.float64)
    top = logits.max(axis=1, keepdims=True)
    log_z = top[:, 0] + np.log(np.exp(logits - top).sum(axis=1))
    return log_z - logits[np.arange(len(labels)), labels]


def loss_mia_auc(forget_losses: np.ndarray, test_losses: np.ndarray) -> float | None:
    if len(forget_losses) == 0 or len(test_losses) == 0:
        return None
    members = np.concatenate([np.ones(len(forget_losses)), np.zeros(len(test_losses))])
    return round(float(roc_auc_score(members, -np.concatenate([forget_losses, test_losses]))), 4)
