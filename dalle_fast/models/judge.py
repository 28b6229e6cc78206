"""The judge of caption fidelity: an attribute classifier for images of the built-in shapes data.

It is trained (dalle_fast.evaluation.fidelity) on the dataset's own rendered images, every colour-shape
pair included: it judges the model's samples, it is not the model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class AttributeClassifier(nn.Module):
    """images (B, 3, S, S) in [0, 1] -> per colour: presence logit (B, C), shape logits (B, C, shapes)
    and centre (B, C, 2) in [0, 1], for `colors` colours and `shapes` shapes. (Factored by colour:
    telling colours apart is easy, so each shape head only has to name the shape of one colour's object.)"""

    def __init__(self, colors: int, shapes: int, width: int = 32):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1), nn.BatchNorm2d(w), nn.GELU(),
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), nn.BatchNorm2d(2 * w), nn.GELU(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w), nn.GELU(),
            nn.Conv2d(2 * w, 4 * w, 3, stride=2, padding=1), nn.BatchNorm2d(4 * w), nn.GELU(),
            nn.AdaptiveAvgPool2d(4), nn.Flatten(),
        )  # fmt: skip
        self.colors, self.shapes = colors, shapes
        self.per = 1 + shapes + 2
        self.head = nn.Sequential(nn.Linear(64 * w, 256), nn.GELU(), nn.Linear(256, colors * self.per))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out = self.head(self.features(images * 2 - 1)).view(-1, self.colors, self.per)
        return out[..., 0], out[..., 1 : 1 + self.shapes], out[..., -2:].sigmoid()


class JudgeFeatures(nn.Module):
    """The judge as a feature extractor (the evaluation's `shapes` extractor): images (B, 3, S, S) in
    [0, 1] -> (features (B, 256): its last hidden layer, logits (B, colors * shapes) over the colour-shape
    pairs, log(sigmoid(presence of c) * softmax(shape logits of c)[s]): the classes of the Inception score)."""

    def __init__(self, judge: AttributeClassifier):
        super().__init__()
        self.judge = judge

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        j = self.judge
        hidden = j.head[1](j.head[0](j.features(images * 2 - 1)))  # (B, 256)
        out = j.head[2](hidden).view(-1, j.colors, j.per)
        logits = F.logsigmoid(out[..., :1]) + out[..., 1 : 1 + j.shapes].log_softmax(-1)  # (B, C, shapes)
        return hidden, logits.flatten(1)
