"""The CDAE: a convolutional encoder-decoder with a bottleneck, in residual form, with a defect head.

One module owns the architecture: training builds it from here, the engine loads packages into it.

Input channels: the normalised frame and a saturation indicator (pixels at the ADC's full scale),
because a clipped pixel carries no noise and must not be "denoised" into something else.
Outputs: ``restored = frame + correction`` (the residual formulation keeps an identity path, so
real bright features, edges and point sources pass through unless the network decides to change
them) and ``defect_logit``, a per-pixel logit that the pixel is a detector defect (as deepCR does
for cosmic rays); the engine publishes its sigmoid as the defect mask.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

ARCHITECTURE_NAME = "cdae-unet"


class ArchitectureConfig(BaseModel):
    """Parameters of the CDAE; saved in every model package's manifest."""

    model_config = ConfigDict(extra="forbid")

    name: Literal["cdae-unet"] = ARCHITECTURE_NAME
    in_channels: int = Field(2, ge=1, le=2, description="1: frame only; 2: frame + saturation mask")
    base_width: int = Field(16, ge=4, le=128, description="feature channels at full resolution")
    depth: int = Field(2, ge=1, le=5, description="number of 2x downsamplings to the bottleneck")
    width_multiplier: float = Field(2.0, ge=1.0, le=4.0, description="channel growth per level")
    convs_per_level: int = Field(2, ge=1, le=4)
    defect_head: bool = True
    activation: Literal["relu", "leaky_relu", "silu"] = "leaky_relu"
    compression: Literal["none", "asinh"] = Field(
        "asinh", description="range compression of the normalised frame inside the network"
    )
    compression_scale: float = Field(1.0, gt=0.0, description="asinh is linear below about this level")
    saturation_gate: bool = Field(
        True, description="saturated input pixels change only as far as the defect head calls them defects"
    )

    @property
    def multiple(self) -> int:
        """Height and width are padded to a multiple of this."""
        return 2**self.depth

    def widths(self) -> list[int]:
        return [int(round(self.base_width * self.width_multiplier**i)) for i in range(self.depth + 1)]


def _act(kind: str) -> nn.Module:
    if kind == "relu":
        return nn.ReLU(inplace=True)
    if kind == "silu":
        return nn.SiLU(inplace=True)
    return nn.LeakyReLU(0.1, inplace=True)


def _block(c_in: int, c_out: int, n: int, act: str) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(n):
        layers += [nn.Conv2d(c_in if i == 0 else c_out, c_out, 3, padding=1), _act(act)]
    return nn.Sequential(*layers)


class CDAE(nn.Module):
    """U-Net style denoising autoencoder; forward takes and returns normalised tensors.

    ``forward(x)`` with ``x`` of shape (N, C, H, W), H and W multiples of ``config.multiple``
    (``restore`` pads and crops any size), returns ``(restored, defect_logit)``; each (N, 1, H, W).
    """

    def __init__(self, config: ArchitectureConfig) -> None:
        super().__init__()
        self.config = config
        w = config.widths()
        act = config.activation
        n = config.convs_per_level
        self.stem = _block(config.in_channels, w[0], n, act)
        self.down = nn.ModuleList()
        self.enc = nn.ModuleList()
        for i in range(1, config.depth + 1):
            self.down.append(nn.Sequential(nn.Conv2d(w[i - 1], w[i], 2, stride=2), _act(act)))
            self.enc.append(_block(w[i], w[i], n, act))
        self.up = nn.ModuleList()
        self.dec = nn.ModuleList()
        for i in range(config.depth, 0, -1):
            self.up.append(nn.ConvTranspose2d(w[i], w[i - 1], 2, stride=2))
            self.dec.append(_block(2 * w[i - 1], w[i - 1], n, act))
        self.head = nn.Conv2d(w[0], 2 if config.defect_head else 1, 1)

    def compress(self, frame: torch.Tensor) -> torch.Tensor:
        """Range compression: linear for the scene, logarithmic for defects far above it.

        A hot pixel or a saturated glint in a dim frame sits 10-1000x above the scene in
        normalised units; compressing keeps every input within a range a small CNN handles,
        while the residual path and the loss stay in the same (compressed) space.
        """
        if self.config.compression == "none":
            return frame
        s = self.config.compression_scale
        return torch.asinh(frame / s) * s

    def expand(self, frame: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`compress`."""
        if self.config.compression == "none":
            return frame
        s = self.config.compression_scale
        return torch.sinh(frame / s) * s

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        restored, defect_logit = self.forward_compressed(x)
        return self.expand(restored), defect_logit

    def forward_compressed(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Like ``forward`` but the restored frame stays compressed (training computes its loss there)."""
        frame = self.compress(x[:, :1])
        x = torch.cat([frame, x[:, 1:]], dim=1) if x.shape[1] > 1 else frame
        h = self.stem(x)
        skips = [h]
        for down, enc in zip(self.down, self.enc):
            h = enc(down(h))
            skips.append(h)
        skips.pop()
        for up, dec in zip(self.up, self.dec):
            h = dec(torch.cat([up(h), skips.pop()], dim=1))
        out = self.head(h)
        restored = frame + out[:, :1]
        if self.config.defect_head:
            defect_logit = out[:, 1:2]
        else:
            defect_logit = torch.full_like(restored, -20.0)
        if self.config.saturation_gate and self.config.defect_head and x.shape[1] > 1:
            # A saturated pixel carries no noise: the only reason to change it is that it is an
            # artefact (glint, bloom, hot pixel), which is the defect head's call. Real saturated
            # features (the physicist's brightest data) pass through unchanged.
            keep = x[:, 1:2] * (1.0 - torch.sigmoid(defect_logit))
            restored = restored + keep * (frame - restored)
        return restored, defect_logit


def pad_to_multiple(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Reflect-pad the last two dims up to a multiple; returns the padded tensor and original (H, W)."""
    h, w = x.shape[-2:]
    ph = (-h) % multiple
    pw = (-w) % multiple
    if ph or pw:
        # reflect needs pad < size; replicate covers tiny frames
        mode = "reflect" if (ph < h and pw < w) else "replicate"
        x = F.pad(x, (0, pw, 0, ph), mode=mode)
    return x, (h, w)


class OutputAverage(nn.Module):
    """An ensemble of independently trained CDAEs fused by averaging their outputs.

    Independently initialised networks sit in different loss basins, so their *weights* cannot
    be averaged; their outputs can (restored frames and defect logits are averaged).
    """

    def __init__(self, members: list[CDAE]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)
        self.config = members[0].config

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        outs = [m(x) for m in self.members]
        restored = torch.stack([o[0] for o in outs]).mean(dim=0)
        logit = torch.stack([o[1] for o in outs]).mean(dim=0)
        return restored, logit


def build_model(config: ArchitectureConfig, members: int = 1) -> nn.Module:
    """Build a CDAE (or an output-averaging ensemble of ``members``) from its configuration.

    The one entry point used by training and the engine.
    """
    if members <= 1:
        return CDAE(config)
    return OutputAverage([CDAE(config) for _ in range(members)])


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
