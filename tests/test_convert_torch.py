"""Tests of the conversion of the authors' PyTorch state_dicts.

A PyTorch copy of the network (`torch_reference_unet`) with tiny widths and
randomized params is saved with torch.save and converted. The converted Flax
model must reproduce its scores and the SPR residual maps. The end-to-end test
converts with the CLI into a workdir that run_lib then evaluates and predicts
with, on a fake MVTec AD category.
"""

import csv
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import anomaly_trees
import saved_states
from configs import base
from configs import mvtec
from sprs_jax import convert_torch
from sprs_jax import input_pipeline
from sprs_jax import model as model_lib
from sprs_jax import predict
from sprs_jax import run_lib
from sprs_jax import scoring
from sprs_jax import sde
from sprs_jax import threshold
from test_run import OVERRIDES
import torch_reference_unet as reference

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
WIDTHS = (32, 64, 64)
NUM_GROUPS = 16
EMBED_DIM = 32
# (height, width). 22 and 18 are not divisible by 2^(3 - 1), so the decoder
# zero-pads the upsampled features on both axes.
IMAGE_SIZES = [(16, 16), (18, 22)]
TOLERANCE = 1e-4
T_SCORING = 1e-3
NUM_DRAWS = 3
CATEGORY = anomaly_trees.SPECS["mvtec_ad"].category


def _model_config(widths=WIDTHS, num_groups=NUM_GROUPS, embed_dim=EMBED_DIM):
  config = base.get_base_config().model
  config.widths = widths
  config.num_groups = num_groups
  config.embed_dim = embed_dim
  return config


def _torch_net(widths=WIDTHS, num_groups=NUM_GROUPS, embed_dim=EMBED_DIM,
               seed=0):
  torch.manual_seed(seed)
  net = reference.UNet(widths, num_groups, embed_dim)
  reference.randomize_(net, seed)
  return net.eval()


def _numpy_state_dict(net):
  return {key: value.numpy() for key, value in net.state_dict().items()}


def _torch_scores(net, images, times):
  """Runs the torch net on NHWC NumPy images and returns NHWC scores."""
  with torch.no_grad():
    scores = net(torch.from_numpy(images).permute(0, 3, 1, 2),
                 torch.from_numpy(times))
  return scores.permute(0, 2, 3, 1).numpy()


def _snapshot(folder):
  """Returns {relative path: bytes} of every file under folder."""
  return {
      str(path.relative_to(folder)): path.read_bytes()
      for path in sorted(pathlib.Path(folder).rglob("*")) if path.is_file()
  }


def _read_json(path):
  with open(path) as f:
    return json.load(f)


@pytest.fixture(scope="module")
def torch_net():
  return _torch_net()


@pytest.fixture(scope="module")
def pth_path(torch_net, tmp_path_factory):
  path = tmp_path_factory.mktemp("pth") / "bottle.pth"
  torch.save(torch_net.state_dict(), path)
  return path


@pytest.fixture(scope="module")
def flax_apply(pth_path):
  """Returns jitted (images NHWC, t) -> scores of the converted params."""
  params = convert_torch.convert_state_dict(
      convert_torch.load_state_dict(str(pth_path)), _model_config())
  model = model_lib.create_model(_model_config(), 25.0)
  apply = jax.jit(lambda x, t: model.apply({"params": params}, x, t))
  return apply


# Numerical equivalence


@pytest.mark.parametrize("height, width", IMAGE_SIZES)
def test_scores_match_torch(torch_net, flax_apply, height, width):
  rng = np.random.default_rng(height)
  images = rng.uniform(-1.0, 1.0, (3, height, width, 3)).astype(np.float32)
  times = np.array([0.2, 0.4, T_SCORING], np.float32)

  expected = _torch_scores(torch_net, images, times)
  actual = np.asarray(flax_apply(images, times))

  assert actual.shape == (3, height, width, 3)
  # The randomized params must give scores far from zero, or the check is
  # weak.
  assert np.abs(expected[:2]).mean() > 0.3
  assert np.abs(actual[:2] - expected[:2]).max() <= TOLERANCE
  # At t = 1e-3 the scores are divided by sigma(t) = 0.03 and reach about
  # 100. There float32 rounding alone makes either side differ from a
  # float64 run of the torch net by about 1.5e-4, so the bound is relative.
  scale = np.abs(expected[2]).max()
  assert scale > 10.0
  assert np.abs(actual[2] - expected[2]).max() <= TOLERANCE * 0.1 * scale


@pytest.mark.parametrize("height, width", IMAGE_SIZES)
def test_residual_maps_match_torch(torch_net, flax_apply, height, width):
  rng = np.random.default_rng(height + 1)
  batch = 2
  images = rng.uniform(-1.0, 1.0, (batch, height, width, 3)).astype(np.float32)
  unit_noise = rng.standard_normal(
      (NUM_DRAWS, batch, height, width, 3)).astype(np.float32)
  times = np.full((batch,), T_SCORING, np.float32)
  std = float(sde.marginal_std(T_SCORING))

  # e = (sigma(t)^2 s(x + n, t) + n)^2, averaged over channels and draws.
  torch_maps, flax_maps = [], []
  for z in unit_noise:
    noise = std * z
    torch_scores = _torch_scores(torch_net, images + noise, times)
    torch_maps.append(np.mean((std**2 * torch_scores + noise)**2, axis=-1))
    flax_scores = np.asarray(flax_apply(images + noise, times))
    flax_maps.append(np.mean((std**2 * flax_scores + noise)**2, axis=-1))
  expected = np.mean(torch_maps, axis=0)
  actual = np.mean(flax_maps, axis=0)

  assert actual.shape == (batch, height, width)
  assert np.abs(actual - expected).max() <= TOLERANCE
  # The maps are of order sigma(t)^2 = 1e-3, so the check is repeated on the
  # maps divided by it, which are of order 1.
  assert np.abs(actual - expected).max() / std**2 <= TOLERANCE


def test_resilience_maps_match_torch(torch_net, flax_apply):
  """Runs scoring.resilience_maps on both nets with the same noise keys."""
  height, width = IMAGE_SIZES[1]
  rng = np.random.default_rng(7)
  images = rng.uniform(-1.0, 1.0, (2, height, width, 3)).astype(np.float32)
  keys = jax.random.split(jax.random.key(0), 2)

  def torch_score_fn(x, t):
    shape = jax.ShapeDtypeStruct(x.shape, jnp.float32)
    return jax.pure_callback(
        lambda x, t: _torch_scores(torch_net, np.array(x), np.array(t)),
        shape, x, t, vmap_method="sequential")

  def maps(score_fn):
    return jax.jit(lambda x, k: scoring.resilience_maps(
        score_fn, x, k, (T_SCORING,), NUM_DRAWS, 25.0))(images, keys)

  expected = maps(torch_score_fn)
  actual = maps(flax_apply)

  assert actual.shape == (2, height, width)
  assert np.abs(np.asarray(actual) - np.asarray(expected)).max() <= TOLERANCE


def test_full_size_layout_fits_model():
  net = reference.UNet()
  state_dict = _numpy_state_dict(net)
  assert sum(value.size for value in state_dict.values()) == 17_843_331

  config = base.get_base_config()
  params = convert_torch.convert_state_dict(state_dict, config.model)

  # Raises if any leaf's path or shape differs from model.UNet's.
  convert_torch._check_params_fit_model(params, config)
  assert model_lib.count_params(params) == 17_843_331
  np.testing.assert_array_equal(params["embed_fourier"]["W"],
                                state_dict["embed.0.W"])
  np.testing.assert_array_equal(
      params["up2"]["conv1"]["kernel"],
      state_dict["up2.conv.double_conv.3.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(params["dense_d3"]["kernel"],
                                state_dict["dense_d3.dense.weight"].T)


def test_infer_architecture_reads_widths():
  state_dict = _numpy_state_dict(_torch_net())
  assert convert_torch.infer_architecture(state_dict) == (WIDTHS, EMBED_DIM)


# State_dict errors


@pytest.fixture
def state_dict():
  return _numpy_state_dict(_torch_net(seed=1))


def test_missing_key_named(state_dict):
  del state_dict["up1.conv.double_conv.4.bias"]
  with pytest.raises(ValueError,
                     match=r"missing key 'up1.conv.double_conv.4.bias'"):
    convert_torch.convert_state_dict(state_dict)


def test_missing_width_key_named(state_dict):
  del state_dict["down2.maxpool_conv.1.double_conv.3.weight"]
  with pytest.raises(ValueError, match="no key 'down2.maxpool_conv"):
    convert_torch.convert_state_dict(state_dict)


def test_unexpected_key_named(state_dict):
  state_dict["up1.conv.double_conv.2.weight"] = np.zeros((4,), np.float32)
  with pytest.raises(ValueError,
                     match=r"unexpected key 'up1.conv.double_conv.2.weight'"):
    convert_torch.convert_state_dict(state_dict)


def test_wrong_shape_named(state_dict):
  state_dict["outc.conv.weight"] = np.zeros((3, 64, 1, 1), np.float32)
  with pytest.raises(ValueError) as error:
    convert_torch.convert_state_dict(state_dict)
  message = str(error.value)
  assert "'outc.conv.weight' has shape (3, 64, 1, 1)" in message
  assert "expected (3, 32, 1, 1)" in message
  assert "torch.save(model.state_dict(), path)" in message


def test_integer_tensor_rejected(state_dict):
  state_dict["dense_in.dense.bias"] = np.zeros((32,), np.int64)
  with pytest.raises(ValueError, match="'dense_in.dense.bias' has dtype int64"):
    convert_torch.convert_state_dict(state_dict)


def test_gap_in_levels_rejected(state_dict):
  renamed = {key.replace("down2.", "down3."): value
             for key, value in state_dict.items()}
  with pytest.raises(ValueError, match=r"down\[1, 3\]"):
    convert_torch.convert_state_dict(renamed)


def test_widths_mismatch_names_override(state_dict):
  with pytest.raises(ValueError) as error:
    convert_torch.convert_state_dict(
        state_dict, _model_config(widths=(32, 64, 128)))
  message = str(error.value)
  assert ("model.widths: state_dict (32, 64, 64), config (32, 64, 128)"
          in message)
  assert "'--config.model.widths=(32, 64, 64)'" in message


def test_embed_dim_mismatch_names_override(state_dict):
  with pytest.raises(ValueError, match="--config.model.embed_dim=32"):
    convert_torch.convert_state_dict(state_dict, _model_config(embed_dim=256))


# Reading .pth files


def test_load_strips_data_parallel_prefix(state_dict, tmp_path):
  path = tmp_path / "bottle.pth"
  torch.save({f"module.{key}": torch.from_numpy(value)
              for key, value in state_dict.items()}, path)

  loaded = convert_torch.load_state_dict(str(path))

  assert sorted(loaded) == sorted(state_dict)
  np.testing.assert_array_equal(loaded["embed.1.weight"],
                                state_dict["embed.1.weight"])


def test_load_unwraps_model_key(torch_net, tmp_path):
  path = tmp_path / "bottle.pth"
  torch.save({"model": torch_net.state_dict(), "epoch": 3000}, path)
  loaded = convert_torch.load_state_dict(str(path))
  assert "outc.conv.bias" in loaded


def test_load_several_wrapped_dicts_need_key(torch_net, tmp_path):
  path = tmp_path / "bottle.pth"
  torch.save({"model": torch_net.state_dict(), "ema": torch_net.state_dict()},
             path)

  with pytest.raises(ValueError, match="several state_dicts"):
    convert_torch.load_state_dict(str(path))
  loaded = convert_torch.load_state_dict(str(path), state_dict_key="ema")
  assert "outc.conv.bias" in loaded


def test_load_unknown_wrapper_lists_keys(torch_net, tmp_path):
  path = tmp_path / "bottle.pth"
  torch.save({"weights": torch_net.state_dict(), "step": 5}, path)
  with pytest.raises(ValueError, match="'weights', 'step'.*--state_dict_key"):
    convert_torch.load_state_dict(str(path))


def test_load_converts_half_precision(torch_net, tmp_path):
  path = tmp_path / "bottle.pth"
  torch.save({key: value.half() for key, value in
              torch_net.state_dict().items()}, path)
  loaded = convert_torch.load_state_dict(str(path))
  assert {value.dtype for value in loaded.values()} == {np.dtype(np.float32)}


def test_load_non_torch_file_named(tmp_path):
  path = tmp_path / "bottle.pth"
  path.write_text("not a checkpoint")
  with pytest.raises(ValueError, match="Failed to read .*bottle.pth"):
    convert_torch.load_state_dict(str(path))


def test_load_missing_file_named(tmp_path):
  with pytest.raises(ValueError, match="missing.pth' does not exist"):
    convert_torch.load_state_dict(str(tmp_path / "missing.pth"))


def test_load_without_torch_explains_install(monkeypatch, tmp_path):
  monkeypatch.setitem(sys.modules, "torch", None)
  with pytest.raises(ImportError, match="pip install torch"):
    convert_torch.load_state_dict(str(tmp_path / "bottle.pth"))


# Category and config


def test_category_from_file_stem():
  category, config = convert_torch.resolve_config("weights/carpet.pth", None,
                                                  None)
  assert category == "carpet"
  assert config.data.name == "mvtec_ad"
  assert config.data.category == "carpet"


def test_other_category_requires_config():
  with pytest.raises(ValueError, match="not an MVTec AD category.*--config"):
    convert_torch.resolve_config("model_ema.pth", None, None)


def test_config_of_all_categories_rejected():
  with pytest.raises(ValueError, match="--config=configs/mvtec.py:carpet"):
    convert_torch.resolve_config("carpet.pth", None, mvtec.get_config("all"))


def test_config_category_must_match():
  with pytest.raises(ValueError, match="--category=bottle"):
    convert_torch.resolve_config("carpet.pth", None,
                                 mvtec.get_config("bottle"))


# Workdir


def _tiny_config(tmp_path, **changes):
  config = mvtec.get_config(CATEGORY)
  config.update_from_flattened_dict({
      "data.data_dir": str(tmp_path / "data"), **OVERRIDES, **changes})
  return config


def _save_tiny_net(path, seed=0):
  net = _torch_net(OVERRIDES["model.widths"], OVERRIDES["model.num_groups"],
                   OVERRIDES["model.embed_dim"], seed=seed)
  torch.save(net.state_dict(), path)
  return net


def test_existing_checkpoint_kept(tmp_path):
  pth = tmp_path / f"{CATEGORY}.pth"
  _save_tiny_net(pth)
  workdir = tmp_path / "workdir"
  config = _tiny_config(tmp_path)
  convert_torch.convert(str(pth), str(workdir), config)
  before = _snapshot(workdir)

  _save_tiny_net(pth, seed=1)
  with pytest.raises(ValueError, match="already contains checkpoints") as error:
    convert_torch.convert(str(pth), str(workdir), config)

  assert str(workdir / CATEGORY / "checkpoints") in str(error.value)
  assert _snapshot(workdir) == before


def test_invalid_file_writes_nothing(tmp_path):
  pth = tmp_path / f"{CATEGORY}.pth"
  torch.save({"inc.double_conv.3.weight": torch.zeros(8, 8, 3, 3)}, pth)
  workdir = tmp_path / "workdir"

  with pytest.raises(ValueError, match="has no key 'embed.1.weight'"):
    convert_torch.convert(str(pth), str(workdir), _tiny_config(tmp_path))
  assert not workdir.exists()


def test_state_contains_converted_params(tmp_path):
  pth = tmp_path / f"{CATEGORY}.pth"
  net = _save_tiny_net(pth)
  config = _tiny_config(tmp_path)

  conversion = convert_torch.convert(str(pth), str(tmp_path / "w"), config)

  # The data set is not prepared, so the step is 1.
  assert conversion.step == 1
  assert not conversion.data_prepared
  state = saved_states.restore_latest(config, conversion.category_dir)[0]
  expected = convert_torch.convert_state_dict(_numpy_state_dict(net))
  assert int(state.step) == 1
  for tree in (state.params, state.ema_params):
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    expected_leaves = jax.tree_util.tree_leaves(expected)
    assert len(leaves) == len(expected_leaves)
    for (path, actual), wanted in zip(leaves, expected_leaves):
      np.testing.assert_array_equal(actual, wanted,
                                    err_msg=jax.tree_util.keystr(path))
  # A fresh AdamW state: zero moments and a zero update count.
  for path, leaf in jax.tree_util.tree_leaves_with_path(state.opt_state):
    assert not np.any(leaf), jax.tree_util.keystr(path)
  saved = _read_json(pathlib.Path(conversion.category_dir) / "config.json")
  assert saved == json.loads(json.dumps(config.to_dict()))


# End to end: CLI conversion, evaluate and predict


@pytest.fixture(scope="module")
def fake_category(tmp_path_factory):
  root = tmp_path_factory.mktemp("e2e")
  tree = anomaly_trees.write_category(root / "manual",
                                      anomaly_trees.SPECS["mvtec_ad"])
  return root, tree


def _cli_overrides(root, tree):
  return {"data.manual_dir": str(tree.manual_dir),
          "data.data_dir": str(root / "data"), **OVERRIDES}


def test_cli_convert_then_evaluate_and_predict(fake_category):
  root, tree = fake_category
  pth = root / f"{CATEGORY}.pth"
  _save_tiny_net(pth)
  workdir = root / "workdir"
  overrides = _cli_overrides(root, tree)
  command = [sys.executable, "-m", "sprs_jax.convert_torch",
             f"--checkpoint={pth}", f"--workdir={workdir}",
             f"--config=configs/mvtec.py:{CATEGORY}"]
  command += [f"--config.{key}={value}" for key, value in overrides.items()]
  environment = dict(os.environ, JAX_PLATFORMS="cpu",
                     XLA_FLAGS="--xla_force_host_platform_device_count=2")

  completed = subprocess.run(command, cwd=REPO_ROOT, env=environment,
                             capture_output=True, text=True, timeout=300)

  assert completed.returncode == 0, completed.stderr[-3000:]
  assert "step 1" in completed.stderr
  assert "--mode=evaluate" in completed.stderr
  assert "--mode=predict" in completed.stderr
  assert os.listdir(workdir / CATEGORY / "checkpoints") == ["1"]

  config = mvtec.get_config(CATEGORY)
  config.update_from_flattened_dict(overrides)
  results = run_lib.run(config, str(workdir), "evaluate")

  for key in ("image_auroc", "pixel_auroc", "aupro", "f1_max"):
    assert 0.0 <= results[CATEGORY][key] <= 1.0, key
  record = _read_json(workdir / CATEGORY / threshold.FILE_NAME)
  assert record["checkpoint_step"] == 1

  photo = root / "photo.png"
  anomaly_trees.write_image(photo, anomaly_trees.random_image(
      np.random.default_rng(3), (20, 12)))
  summary = run_lib.predict(str(workdir), str(photo),
                            str(root / "predictions"))
  assert summary.num_images == 1
  with open(root / "predictions" / predict.CSV_NAME, newline="") as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == 1
  assert rows[0]["verdict"] in ("normal", "anomalous")


def test_prepared_data_stores_total_steps(fake_category):
  """Once the data set is prepared, the step is training's last step.

  Three training images in batches of 8 make one step per epoch, so 4
  epochs make 4 steps, the total that train.train compares the latest step
  with before it skips a finished training.
  """
  root, tree = fake_category
  pth = root / "prepared.pth"
  _save_tiny_net(pth)
  config = mvtec.get_config(CATEGORY)
  config.update_from_flattened_dict(_cli_overrides(root, tree))
  config.training.num_epochs = 4
  source = input_pipeline.load_split(config.data, "train")

  conversion = convert_torch.convert(str(pth), str(root / "prepared"), config,
                                     category=CATEGORY)

  assert conversion.data_prepared
  assert conversion.step == 4
  loader = input_pipeline.TrainLoader(
      source, config.data.image_size, config.training.batch_size, config.seed)
  assert conversion.step == config.training.num_epochs * loader.steps_per_epoch


def test_cli_error_exits_with_message(tmp_path):
  completed = subprocess.run(
      [sys.executable, "-m", "sprs_jax.convert_torch",
       f"--checkpoint={tmp_path / 'carpet.pth'}",
       f"--workdir={tmp_path / 'w'}"],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))

  assert completed.returncode == 1
  assert "Traceback" not in completed.stderr
  assert "error: The checkpoint" in completed.stderr
  assert "does not exist" in completed.stderr
  assert not (tmp_path / "w").exists()
