"""The score network: a U-Net conditioned on the diffusion time t.

The layer layout follows the authors' PyTorch release layer for layer, and the
submodule names (``inc``, ``down1`` .. ``down4``, ``up1`` .. ``up4``,
``dense_in``, ``dense_d1`` .., ``dense_u1`` .., ``outc``, ``embed``) mirror its
state_dict keys so that published weights map one to one. Tensors are NHWC.
"""

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sprs_jax import sde


def swish(x):
  return x * jax.nn.sigmoid(x)


def max_pool_2x2(x: jax.Array) -> jax.Array:
  """Returns the 2x2, stride 2 max of [B, H, W, C], dropping odd last rows.

  A reshape and a max instead of a reduce-window: XLA on CPU differentiates
  the reshape form with a cheap mask where the window form needs a scatter.
  """
  batch, height, width, channels = x.shape
  x = x[:, :height // 2 * 2, :width // 2 * 2, :]
  x = x.reshape(batch, height // 2, 2, width // 2, 2, channels)
  return jnp.max(x, axis=(2, 4))


def _align_corners_matrix(size_in: int, size_out: int) -> np.ndarray:
  """Returns the [size_out, size_in] bilinear interpolation matrix.

  Output pixel i samples the input at i * (size_in - 1) / (size_out - 1), which
  is PyTorch's ``align_corners=True``: the corner pixels of input and output
  coincide.
  """
  matrix = np.zeros((size_out, size_in), np.float32)
  if size_in == 1 or size_out == 1:
    matrix[:, 0] = 1.0
    return matrix
  positions = np.arange(size_out) * (size_in - 1) / (size_out - 1)
  lower = np.minimum(np.floor(positions).astype(np.int64), size_in - 2)
  weight_upper = (positions - lower).astype(np.float32)
  rows = np.arange(size_out)
  matrix[rows, lower] = 1.0 - weight_upper
  matrix[rows, lower + 1] = weight_upper
  return matrix


def upsample2x_align_corners(x: jax.Array) -> jax.Array:
  """Upsamples [B, H, W, C] to [B, 2H, 2W, C] bilinearly, align_corners=True.

  Written as two small matrix products, which XLA runs faster on CPU than a
  generic gather-based resize.
  """
  _, height, width, _ = x.shape
  rows = jnp.asarray(_align_corners_matrix(height, 2 * height), x.dtype)
  cols = jnp.asarray(_align_corners_matrix(width, 2 * width), x.dtype)
  x = jnp.einsum("oh,bhwc->bowc", rows, x)
  return jnp.einsum("pw,bowc->bopc", cols, x)


class GaussianFourierProjection(nn.Module):
  """Random Fourier features of t with fixed, untrained frequencies.

  The frequencies W ~ N(0, scale^2) live in the ``params`` collection, so they
  are checkpointed and counted, but receive no gradient. The optimizer must
  also leave them alone (see ``train.FROZEN_PARAM_NAMES``).
  """
  embed_dim: int
  scale: float = 30.0

  @nn.compact
  def __call__(self, t):
    init = lambda key, shape: self.scale * jax.random.normal(key, shape)
    frequencies = self.param("W", init, (self.embed_dim // 2,))
    frequencies = jax.lax.stop_gradient(frequencies)
    angles = t[:, None] * frequencies[None, :] * 2.0 * np.pi
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


class GroupNorm(nn.Module):
  """GroupNorm over [B, H, W, C] with per-channel scale and bias.

  Matches flax.linen.GroupNorm (and PyTorch's nn.GroupNorm) with the same
  param names. The statistics are summed per channel over H and W first and
  only then over the channels of a group, which XLA on CPU reduces about
  three times faster than the grouped reshape. Statistics are float32.
  """
  num_groups: int = 32
  epsilon: float = 1e-5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    batch, height, width, channels = x.shape
    group_size = channels // self.num_groups
    scale = self.param("scale", nn.initializers.ones, (channels,))
    bias = self.param("bias", nn.initializers.zeros, (channels,))

    x32 = x.astype(jnp.float32)
    count = height * width * group_size
    sums = jnp.sum(x32, axis=(1, 2)).reshape(batch, self.num_groups, -1)
    squares = jnp.sum(jnp.square(x32), axis=(1, 2)).reshape(
        batch, self.num_groups, -1)
    mean = jnp.sum(sums, axis=-1) / count
    variance = jnp.maximum(jnp.sum(squares, axis=-1) / count - mean**2, 0.0)
    inverse_std = jax.lax.rsqrt(variance + self.epsilon)

    # y = x * multiplier + offset, per example and channel.
    multiplier = jnp.repeat(inverse_std, group_size, axis=1) * scale
    offset = bias - jnp.repeat(mean, group_size, axis=1) * multiplier
    y = x32 * multiplier[:, None, None, :] + offset[:, None, None, :]
    return y.astype(self.dtype)


class DoubleConv(nn.Module):
  """Two [3x3 conv, GroupNorm, swish] layers; the first outputs mid channels."""
  features: int
  mid_features: int | None = None
  num_groups: int = 32
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    mid_features = self.mid_features or self.features
    for index, features in enumerate((mid_features, self.features)):
      x = nn.Conv(features, (3, 3), padding=1, dtype=self.dtype,
                  name=f"conv{index}")(x)
      x = GroupNorm(self.num_groups, 1e-5, self.dtype, name=f"norm{index}")(x)
      x = swish(x)
    return x


class UNet(nn.Module):
  """The SPR score network s(x, t).

  Attributes:
    widths: channels per level from full resolution down, (64, 128, 256, 512,
      512) in the SPR paper. Each must be divisible by num_groups. The decoder
      mirrors the encoder: decoder level k outputs widths[k - 1] channels
      (widths[0] at the top) and its first conv halves its input channels.
    num_groups: GroupNorm groups.
    embed_dim: width of the time embedding.
    fourier_scale: std of the fixed Fourier frequencies.
    sigma_max: the VE SDE's sigma; the output is divided by sigma(t).
    out_channels: channels of the score (the image channels).
    dtype: compute dtype of convolutions and norms; params stay float32.
  """
  widths: Sequence[int] = (64, 128, 256, 512, 512)
  num_groups: int = 32
  embed_dim: int = 256
  fourier_scale: float = 30.0
  sigma_max: float = 25.0
  out_channels: int = 3
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, t):
    """Returns the score, float32 [B, H, W, out_channels], for x [B, H, W, C].

    t is a float vector [B] of diffusion times in (0, 1]. H and W need not be
    divisible by 2^(levels - 1): skips are zero-padded to match, as in the
    reference implementation.
    """
    for width in self.widths:
      if width % self.num_groups:
        raise ValueError(
            f"model.widths {tuple(self.widths)} must all be divisible by "
            f"model.num_groups={self.num_groups}; {width} is not.")
    num_levels = len(self.widths)
    double_conv = lambda features, mid, name: DoubleConv(
        features, mid, self.num_groups, self.dtype, name=name)
    time_dense = lambda features, name: nn.Dense(
        features, dtype=self.dtype, name=name)

    t = t.astype(jnp.float32)
    embed = GaussianFourierProjection(
        self.embed_dim, self.fourier_scale, name="embed_fourier")(t)
    embed = swish(nn.Dense(self.embed_dim, name="embed_dense")(embed))
    embed = embed[:, None, None, :].astype(self.dtype)

    h = x.astype(self.dtype)
    h = double_conv(self.widths[0], None, "inc")(h)
    h = h + time_dense(self.widths[0], "dense_in")(embed)
    skips = [h]
    for level in range(1, num_levels):
      h = max_pool_2x2(h)
      h = double_conv(self.widths[level], None, f"down{level}")(h)
      h = h + time_dense(self.widths[level], f"dense_d{level}")(embed)
      skips.append(h)

    skips.pop()
    for level in range(1, num_levels):
      skip = skips.pop()
      h = upsample2x_align_corners(h)
      pad_h = skip.shape[1] - h.shape[1]
      pad_w = skip.shape[2] - h.shape[2]
      if pad_h or pad_w:
        h = jnp.pad(h, ((0, 0), (pad_h // 2, pad_h - pad_h // 2),
                        (pad_w // 2, pad_w - pad_w // 2), (0, 0)))
      h = jnp.concatenate([skip, h], axis=-1)
      features = self.widths[max(num_levels - 2 - level, 0)]
      h = double_conv(features, h.shape[-1] // 2, f"up{level}")(h)
      h = h + time_dense(features, f"dense_u{level}")(embed)

    h = nn.Conv(self.out_channels, (1, 1), dtype=self.dtype, name="outc")(h)
    h = h.astype(jnp.float32)
    return h / sde.marginal_std(t, self.sigma_max)[:, None, None, None]


def create_model(model_config, sigma_max: float) -> UNet:
  """Builds the UNet from ``config.model`` fields."""
  dtypes = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
  if model_config.dtype not in dtypes:
    raise ValueError(
        f"model.dtype={model_config.dtype!r} is not supported; use one of "
        f"{sorted(dtypes)}.")
  return UNet(
      widths=tuple(model_config.widths),
      num_groups=model_config.num_groups,
      embed_dim=model_config.embed_dim,
      fourier_scale=model_config.fourier_scale,
      sigma_max=sigma_max,
      dtype=dtypes[model_config.dtype])


def count_params(params) -> int:
  """Returns the number of scalars in a params pytree."""
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(params))
