"""XLA flags that make the score network faster on CPU.

Importing ``sprs_jax`` calls `configure` before JAX starts its backend, so the
flags reach XLA in scripts, notebooks and tests alike. A flag the user already
set in XLA_FLAGS is left as the user set it.
"""

import importlib.metadata
import os

# On CPU, XLA 0.10 hands 3x3 convolutions to YNNPACK by default. YNNPACK
# computes their weight gradients about 3x slower than XLA's own Eigen
# kernels, so the U-Net's training step ran 1.6x faster without it.
_CPU_FLAGS = {
    "xla_cpu_experimental_ynn_fusion_type": "-individual_convolution",
}

# Minor versions of jaxlib on which the flags above exist and were measured.
# XLA aborts the process on a flag it does not know, so other versions get
# none of them.
# NOTE: measure and extend this list when jaxlib is upgraded.
_MEASURED_JAXLIB_MINORS = ("0.10",)


def _jaxlib_minor() -> str | None:
  try:
    version = importlib.metadata.version("jaxlib")
  except importlib.metadata.PackageNotFoundError:
    return None
  return ".".join(version.split(".")[:2])


def configure(environ=os.environ) -> list[str]:
  """Adds the CPU flags to environ["XLA_FLAGS"]; returns the flags added.

  Must run before JAX initializes its backend. Flags already named in
  XLA_FLAGS keep the user's value; SPRS_JAX_XLA_FLAGS=0 turns this off.
  """
  if environ.get("SPRS_JAX_XLA_FLAGS", "1") == "0":
    return []
  if _jaxlib_minor() not in _MEASURED_JAXLIB_MINORS:
    return []
  current = environ.get("XLA_FLAGS", "")
  added = [f"--{name}={value}" for name, value in _CPU_FLAGS.items()
           if f"--{name}=" not in current]
  if added:
    environ["XLA_FLAGS"] = " ".join([current] + added).strip()
  return added
