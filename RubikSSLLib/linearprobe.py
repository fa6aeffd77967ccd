"""A frozen-feature linear probe: is a pretrained encoder's representation any better than a random one's?

The encoder stays frozen; each case becomes the global average of its last feature map (BatchNorm statistics
re-estimated on the training images first, for both encoders alike); a logistic regression (L2, full-batch L-BFGS
on standardised features) is fitted on the training cases and scored by ROC-AUC on the validation cases. A
pretext whose features probe no better than a random encoder's has given fine-tuning nothing to start from.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from RubikSSLLib import downstream, models, statistics, transfer
from RubikSSLLib.config import FinetuneConfig
from RubikSSLLib.runloop import recalibrate_batchnorm


@torch.no_grad()
def features(encoder: nn.Module, cases: list[downstream.Case], batch: int = 16) -> np.ndarray:
    """(N, widths[-1]) pooled last-stage features of the cases."""
    encoder.eval()
    pooled = []
    for first in range(0, len(cases), batch):
        images = torch.from_numpy(np.stack([c.image for c in cases[first : first + batch]]))
        pooled.append(encoder(images)[-1].mean(dim=(2, 3, 4)))
    return torch.cat(pooled).numpy()


def fit_logistic(train: np.ndarray, truth: np.ndarray, classes: int, l2: float = 1e-3):
    """A multinomial logistic regression (L2, full-batch L-BFGS) on features standardised with the training
    statistics; returns a function (N, F) features -> (N, classes) probabilities."""
    torch.manual_seed(0)
    mean, spread = train.mean(axis=0), train.std(axis=0) + 1e-6
    x = torch.from_numpy((train - mean) / spread).float()
    y = torch.from_numpy(truth).long()
    layer = nn.Linear(x.shape[1], classes)
    optimiser = torch.optim.LBFGS(layer.parameters(), max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        loss = nn.functional.cross_entropy(layer(x), y) + l2 * layer.weight.pow(2).sum()
        loss.backward()
        return loss

    optimiser.step(closure)

    @torch.no_grad()
    def predict(features: np.ndarray) -> np.ndarray:
        return torch.softmax(layer(torch.from_numpy((features - mean) / spread).float()), dim=1).numpy()

    return predict


def fit_and_score(train: np.ndarray, train_truth: np.ndarray, val: np.ndarray, val_truth: np.ndarray,
                  classes: int) -> float:
    """AUC on `val` of a logistic regression fitted on `train`."""
    return statistics.auc(val_truth, fit_logistic(train, train_truth, classes)(val))


def probe(config: FinetuneConfig, train: list[downstream.Case], val: list[downstream.Case], classes: int,
          init: str | None) -> float:
    """Linear-probe AUC of the encoder of `init` (a pretraining run), or of a random one (None, seeded)."""
    torch.manual_seed(config.seed)
    network = models.build("classify", config.decoder, config.encoder, classes)
    if init is not None:
        transfer.load_encoder(network, init)
    encoder = network.encoder
    task = downstream.Classification(FinetuneConfig(**{**config.__dict__, "augment": "none"}),
                                     np.random.default_rng(config.seed))
    recalibrate_batchnorm(encoder, task.batches(train), 8, torch.device("cpu"), key="image")
    truth = np.array([c.target for c in train]), np.array([c.target for c in val])
    return fit_and_score(features(encoder, train), truth[0], features(encoder, val), truth[1], classes)
