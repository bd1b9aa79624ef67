"""Tests for the XLA flags that sprs_jax sets on import."""

from sprs_jax import xla_flags

_FLAG = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"


def test_adds_flag_after_existing_flags(monkeypatch):
  monkeypatch.setattr(xla_flags, "_jaxlib_minor", lambda: "0.10")
  environ = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  assert xla_flags.configure(environ) == [_FLAG]
  assert environ["XLA_FLAGS"] == (
      "--xla_force_host_platform_device_count=2 " + _FLAG)


def test_keeps_the_users_value(monkeypatch):
  monkeypatch.setattr(xla_flags, "_jaxlib_minor", lambda: "0.10")
  environ = {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=+dot"}
  assert xla_flags.configure(environ) == []
  assert environ["XLA_FLAGS"] == "--xla_cpu_experimental_ynn_fusion_type=+dot"


def test_opt_out_and_unmeasured_jaxlib_add_nothing(monkeypatch):
  monkeypatch.setattr(xla_flags, "_jaxlib_minor", lambda: "0.10")
  environ = {"SPRS_JAX_XLA_FLAGS": "0"}
  assert xla_flags.configure(environ) == []
  assert "XLA_FLAGS" not in environ

  monkeypatch.setattr(xla_flags, "_jaxlib_minor", lambda: "0.99")
  environ = {}
  assert xla_flags.configure(environ) == []
  assert "XLA_FLAGS" not in environ


def test_import_set_the_flag_in_this_process():
  import os
  measured = xla_flags._jaxlib_minor() in xla_flags._MEASURED_JAXLIB_MINORS
  assert (_FLAG in os.environ.get("XLA_FLAGS", "")) == measured
