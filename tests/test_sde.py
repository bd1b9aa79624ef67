"""Tests for the VE noise schedule."""

import math

import numpy as np
import pytest

from sprs_jax import sde


@pytest.mark.parametrize("t", [1e-5, 1e-3, 0.1, 0.5, 1.0])
def test_marginal_std_matches_formula(t):
  expected = math.sqrt((25.0 ** (2 * t) - 1) / (2 * math.log(25.0)))
  assert float(sde.marginal_std(t)) == pytest.approx(expected, rel=1e-5)


def test_marginal_std_known_values():
  assert float(sde.marginal_std(0.0)) == 0.0
  assert float(sde.marginal_std(1e-3)) == pytest.approx(0.03168, abs=1e-5)
  assert float(sde.marginal_std(1.0)) == pytest.approx(9.8453, abs=1e-3)


def test_marginal_std_keeps_shape_and_increases():
  t = np.linspace(1e-5, 1.0, 50).reshape(5, 10)
  std = np.asarray(sde.marginal_std(t))
  assert std.shape == (5, 10)
  assert np.all(np.diff(std.reshape(-1)) > 0)
