"""predict: logits become probabilities through a numerically stable sigmoid (no overflow warning at
float32's extremes, exact limits), each volume once, in dataset order."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from ctlib.data import CLASSES
from ctlib.predict import predict

C = len(CLASSES)


class _FixedLogits(nn.Module):
    """Returns the volume's first C voxels as logits and a 2-D feature."""

    def forward(self, x: torch.Tensor, return_features: bool = False):
        logits = x.reshape(x.shape[0], -1)[:, :C]
        feats = torch.zeros(x.shape[0], 2)
        return (logits, feats) if return_features else logits


class _Volumes(torch.utils.data.Dataset):
    def __init__(self, values: np.ndarray) -> None:
        self.values = torch.as_tensor(values, dtype=torch.float32)

    def __len__(self) -> int:
        return len(self.values)

    def __getitem__(self, i: int):
        return self.values[i].reshape(1, 1, C), torch.zeros(C), f"valid_{i}_a_1.nii.gz"


@pytest.mark.filterwarnings("error::RuntimeWarning")
def test_sigmoid_is_stable_at_float32_extremes():
    logits = np.array([[-100.0] * C, [100.0] * C, [-1000.0] * C, [0.0] * C, [-88.8] * C], dtype=np.float32)
    out = predict(_FixedLogits(), _Volumes(logits), batch_size=2, device=torch.device("cpu"))
    probs = out["probs"]
    assert probs.dtype == np.float32 and np.isfinite(probs).all()
    assert (probs[1] == 1.0).all()  # exp(-100) is below float32's epsilon around 1
    assert (probs[2] == 0.0).all()
    assert (probs[0] >= 0.0).all() and (probs[0] < 1e-40).all()  # 3.7e-44, a float32 subnormal
    assert (probs[3] == 0.5).all()
    np.testing.assert_array_equal(out["logits"], logits)
    np.testing.assert_array_equal(out["index"], np.arange(5))
