"""The SPR score network in PyTorch, as the authors' release lays it out.

Written for the conversion tests from a description of the network's layers
and key names, not copied from the release. Its state_dict has the release's
key names (``embed.0.W``, ``inc.double_conv.0.weight``,
``down1.maxpool_conv.1.double_conv.0.weight``,
``up1.conv.double_conv.0.weight``, ``dense_in.dense.weight``,
``outc.conv.weight``, ...). Tensors are NCHW.
The widths are parameters, so tests can build tiny copies. The release uses
widths (64, 128, 256, 512, 512), 32 GroupNorm groups and embed_dim 256.
"""

import math

import torch
from torch import nn
from torch.nn import functional


def marginal_std(t: torch.Tensor, sigma_max: float = 25.0) -> torch.Tensor:
  """Returns sigma(t) = sqrt((sigma_max^(2t) - 1) / (2 ln sigma_max))."""
  log_sigma = math.log(sigma_max)
  return torch.sqrt(torch.expm1(2.0 * t * log_sigma) / (2.0 * log_sigma))


class GaussianFourierProjection(nn.Module):
  """Fixed random Fourier features [sin, cos] of t, frequencies in ``W``."""

  def __init__(self, embed_dim: int, scale: float = 30.0):
    super().__init__()
    self.W = nn.Parameter(torch.randn(embed_dim // 2) * scale,
                          requires_grad=False)

  def forward(self, t):
    angles = t[:, None] * self.W[None, :] * 2.0 * math.pi
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)


class DoubleConv(nn.Module):
  """[3x3 conv, GroupNorm, SiLU] twice. The first conv outputs mid channels."""

  def __init__(self, in_channels: int, out_channels: int,
               mid_channels: int | None = None, num_groups: int = 32):
    super().__init__()
    mid_channels = mid_channels or out_channels
    self.double_conv = nn.Sequential(
        nn.Conv2d(in_channels, mid_channels, 3, padding=1),
        nn.GroupNorm(num_groups, mid_channels, eps=1e-5),
        nn.SiLU(),
        nn.Conv2d(mid_channels, out_channels, 3, padding=1),
        nn.GroupNorm(num_groups, out_channels, eps=1e-5),
        nn.SiLU(),
    )

  def forward(self, x):
    return self.double_conv(x)


class Down(nn.Module):
  """2x2 max-pool, then DoubleConv."""

  def __init__(self, in_channels: int, out_channels: int, num_groups: int):
    super().__init__()
    self.maxpool_conv = nn.Sequential(
        nn.MaxPool2d(2),
        DoubleConv(in_channels, out_channels, num_groups=num_groups),
    )

  def forward(self, x):
    return self.maxpool_conv(x)


class Up(nn.Module):
  """Upsamples 2x and applies a DoubleConv to [skip, upsampled].

  Upsampling is bilinear with align_corners=True, then zero-padded to the
  skip's size. The first conv outputs in_channels // 2 channels.
  """

  def __init__(self, in_channels: int, out_channels: int, num_groups: int):
    super().__init__()
    self.conv = DoubleConv(in_channels, out_channels, in_channels // 2,
                           num_groups)

  def forward(self, x, skip):
    x = functional.interpolate(x, scale_factor=2, mode="bilinear",
                               align_corners=True)
    pad_h = skip.shape[2] - x.shape[2]
    pad_w = skip.shape[3] - x.shape[3]
    x = functional.pad(x, [pad_w // 2, pad_w - pad_w // 2,
                           pad_h // 2, pad_h - pad_h // 2])
    return self.conv(torch.cat([skip, x], dim=1))


class TimeDense(nn.Module):
  """Linear map of the time embedding to per-channel offsets [B, C, 1, 1]."""

  def __init__(self, embed_dim: int, channels: int):
    super().__init__()
    self.dense = nn.Linear(embed_dim, channels)

  def forward(self, embed):
    return self.dense(embed)[:, :, None, None]


class OutConv(nn.Module):

  def __init__(self, in_channels: int, out_channels: int):
    super().__init__()
    self.conv = nn.Conv2d(in_channels, out_channels, 1)

  def forward(self, x):
    return self.conv(x)


class UNet(nn.Module):
  """The score network s(x, t) for x [B, 3, H, W] and t [B].

  Encoder level k is ``down{k}`` with the time offset ``dense_d{k}``, and
  decoder level k is ``up{k}`` with ``dense_u{k}``. With L levels, decoder
  level k outputs widths[max(L - 2 - k, 0)] channels, so the 5 levels of the
  release give Up(1024, 256), Up(512, 128), Up(256, 64) and Up(128, 64).
  """

  def __init__(self, widths=(64, 128, 256, 512, 512), num_groups: int = 32,
               embed_dim: int = 256, sigma_max: float = 25.0,
               in_channels: int = 3):
    super().__init__()
    self.sigma_max = sigma_max
    self.num_levels = len(widths)
    self.embed = nn.Sequential(GaussianFourierProjection(embed_dim),
                               nn.Linear(embed_dim, embed_dim))
    self.inc = DoubleConv(in_channels, widths[0], num_groups=num_groups)
    self.dense_in = TimeDense(embed_dim, widths[0])
    for level in range(1, self.num_levels):
      setattr(self, f"down{level}",
              Down(widths[level - 1], widths[level], num_groups))
      setattr(self, f"dense_d{level}", TimeDense(embed_dim, widths[level]))

    channels = widths[-1]
    for level in range(1, self.num_levels):
      skip_channels = widths[self.num_levels - 1 - level]
      out_channels = widths[max(self.num_levels - 2 - level, 0)]
      setattr(self, f"up{level}",
              Up(channels + skip_channels, out_channels, num_groups))
      setattr(self, f"dense_u{level}", TimeDense(embed_dim, out_channels))
      channels = out_channels
    self.outc = OutConv(widths[0], in_channels)

  def forward(self, x, t):
    embed = functional.silu(self.embed(t))
    h = self.inc(x) + self.dense_in(embed)
    skips = [h]
    for level in range(1, self.num_levels):
      h = getattr(self, f"down{level}")(h)
      h = h + getattr(self, f"dense_d{level}")(embed)
      skips.append(h)

    skips.pop()
    for level in range(1, self.num_levels):
      h = getattr(self, f"up{level}")(h, skips.pop())
      h = h + getattr(self, f"dense_u{level}")(embed)
    return self.outc(h) / marginal_std(t, self.sigma_max)[:, None, None, None]


def randomize_(model: nn.Module, seed: int) -> None:
  """Redraws every parameter, GroupNorm affine and biases included.

  Freshly built GroupNorm layers have scale 1 and bias 0, which a conversion
  that dropped them would still match. Weights keep a fan-in scale so that
  activations stay of order 1.
  """
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, parameter in model.named_parameters():
      noise = torch.randn(parameter.shape, generator=generator)
      if name == "embed.0.W":
        parameter.copy_(noise * 30.0)
      elif name.endswith(".bias"):
        parameter.copy_(0.2 * noise)
      elif parameter.ndim == 1:
        parameter.copy_(1.0 + 0.3 * noise)
      else:
        fan_in = parameter[0].numel()
        parameter.copy_(noise / math.sqrt(fan_in))
