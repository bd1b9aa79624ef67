"""Training of the score model: state, optimizer, the pmapped step, the loop."""

import json
import os
import time
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from sprs_jax import checkpoint
from sprs_jax import distributed
from sprs_jax import faults
from sprs_jax import losses
from sprs_jax import model as model_lib

# Top-level param names the optimizer never updates (the fixed Fourier
# frequencies of the time embedding).
FROZEN_PARAM_NAMES = ("embed_fourier",)


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  ema_params: Any
  opt_state: Any


def unreplicate(tree):
  """Returns device 0's copy of a pmapped pytree.

  flax.jax_utils.unreplicate keeps the device axis when pmap ran on a subset
  of the local devices (flax 0.12), so this indexes explicitly.
  """
  return jax.tree_util.tree_map(lambda x: x[0], tree)


def learning_rate_schedule(training_config, steps_per_epoch: int):
  """Returns an optax schedule: linear warm-up, then piecewise or cosine.

  "piecewise" multiplies the rate by lr_decay_factor at each epoch in
  lr_decay_epochs; "cosine" decays it to 0 at the last step.
  """
  base = training_config.learning_rate
  warmup = training_config.warmup_steps
  total_steps = training_config.num_epochs * steps_per_epoch
  kind = training_config.lr_schedule
  if kind == "piecewise":
    boundaries = {int(epoch * steps_per_epoch): training_config.lr_decay_factor
                  for epoch in training_config.lr_decay_epochs}
    decay = optax.piecewise_constant_schedule(base, boundaries)
  elif kind == "cosine":
    decay = optax.cosine_decay_schedule(base, max(total_steps - warmup, 1))
  else:
    raise ValueError(
        f"training.lr_schedule={kind!r} is not supported; use 'piecewise' or "
        "'cosine'.")
  if warmup <= 0:
    return decay
  if kind == "cosine":
    return optax.join_schedules(
        [optax.linear_schedule(base / warmup, base, warmup), decay], [warmup])
  return lambda step: decay(step) * jnp.minimum(1.0, (step + 1) / warmup)


def create_optimizer(training_config, steps_per_epoch: int):
  """Returns AdamW that leaves the FROZEN_PARAM_NAMES params unchanged."""
  adamw = optax.adamw(
      learning_rate_schedule(training_config, steps_per_epoch),
      b1=0.9, b2=0.999, eps=1e-8,
      weight_decay=training_config.weight_decay)
  labels = lambda params: {
      name: jax.tree_util.tree_map(
          lambda _: "frozen" if name in FROZEN_PARAM_NAMES else "trained",
          subtree)
      for name, subtree in params.items()}
  return optax.multi_transform(
      {"trained": adamw, "frozen": optax.set_to_zero()}, labels)


def create_train_state(rng, model: nn.Module, optimizer, image_size: int):
  """Initializes params (float32), EMA params and optimizer state."""
  images = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  params = jax.jit(model.init)(rng, images, jnp.ones((1,)))["params"]
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      ema_params=params,
      opt_state=optimizer.init(params))


def ema_decay_at(step, ema_decay: float):
  """Returns the EMA decay for update number ``step`` (1-based).

  min(ema_decay, (1 + step) / (10 + step)): the average follows the params
  closely early on, so short runs get a useful EMA.
  """
  step = jnp.asarray(step, jnp.float32)
  return jnp.minimum(ema_decay, (1.0 + step) / (10.0 + step))


def make_train_step(model: nn.Module, optimizer, learning_rate_fn,
                    training_config, sigma_max: float):
  """Returns train_step(state, images, rng) -> (state, metrics) for pmap.

  It must run under ``jax.pmap(..., axis_name="batch")``. ``images`` is the
  per-device batch [b, H, W, 3] in [-1, 1], and ``rng`` is the base key, the
  same on every device. Gradients and the loss are averaged over all devices, so
  the update equals one step on the whole global batch. ``metrics`` contains
  loss, learning_rate and finite (True when the loss is finite).
  """
  t_min = training_config.t_min
  t_max = training_config.t_max
  ema_decay = training_config.ema_decay

  def train_step(state: TrainState, images, rng):
    per_device = images.shape[0]
    # pmap numbers the devices of all processes in process order (JAX 0.10),
    # which is how TrainLoader slices the global batch. So the ids are the
    # examples' positions in the global batch whatever the process count.
    first_id = jax.lax.axis_index("batch") * per_device
    example_ids = first_id + jnp.arange(per_device)
    step_rng = jax.random.fold_in(rng, state.step)
    t, z = losses.draw_times_and_noise(
        step_rng, example_ids, images.shape[1:], t_min, t_max)

    def loss_fn(params):
      score_fn = lambda x, times: model.apply({"params": params}, x, times)
      return losses.dsm_loss(score_fn, images, t, z, sigma_max)

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    grads = jax.lax.pmean(grads, "batch")
    loss = jax.lax.pmean(loss, "batch")

    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    decay = ema_decay_at(state.step + 1, ema_decay)
    ema_params = jax.tree_util.tree_map(
        lambda ema, new: decay * ema + (1.0 - decay) * new,
        state.ema_params, params)

    new_state = state.replace(step=state.step + 1, params=params,
                              ema_params=ema_params, opt_state=opt_state)
    # Only the loss is checked here: a check of the whole new state in this
    # step raised peak memory by about 250 MiB (full model, 64 px, batch 16
    # on CPU). NaN or Inf in the params makes the next step's loss
    # non-finite, and the whole state is checked before every save.
    metrics = {"loss": loss, "learning_rate": learning_rate_fn(state.step),
               "finite": jnp.isfinite(loss)}
    return new_state, metrics

  return train_step


def _format_seconds(seconds: float) -> str:
  minutes, seconds = divmod(int(seconds), 60)
  hours, minutes = divmod(minutes, 60)
  return f"{hours:d}:{minutes:02d}:{seconds:02d}"


def train(config, category_dir: str, train_loader) -> TrainState:
  """Trains (or resumes training) and returns the final unreplicated state.

  Checkpoints go to ``<category_dir>/checkpoints`` every
  ``training.checkpoint_every_steps`` steps and at the end. A run restarted
  with the same config continues from the latest one, with the same data
  order and noise. Wall time, throughput and the step reached are written to
  ``<category_dir>/train_stats.json`` with every checkpoint.

  Every step's loss is checked for NaN and Inf, and the whole state before
  every save, so no checkpoint is written of a state that has them. SIGTERM and SIGINT stop training after
  the current step and write a checkpoint first. The previous signal handlers
  are restored on return.

  ``train_loader`` provides ``steps_per_epoch`` and ``epoch_batches(epoch,
  start_step)`` as input_pipeline.TrainLoader does.

  Raises:
    faults.TrainingStopped: after SIGTERM or SIGINT, once the checkpoint is
      written.
    FloatingPointError: at the first step whose loss is not finite, or whose
      state is not finite at a save, naming it and the latest checkpoint,
      which stays as it was.
    ValueError: if the checkpoint folder is not writable or lacks room for
      the checkpoints of the run, before training starts.
  """
  checkpoint_dir = os.path.join(category_dir, "checkpoints")
  faults.check_writable(checkpoint_dir)
  training = config.training
  steps_per_epoch = train_loader.steps_per_epoch
  total_steps = training.num_epochs * steps_per_epoch
  model = model_lib.create_model(config.model, config.sde.sigma_max)
  learning_rate_fn = learning_rate_schedule(training, steps_per_epoch)
  optimizer = create_optimizer(training, steps_per_epoch)

  rng = jax.random.key(config.seed)
  init_rng, train_rng = jax.random.split(rng)
  state = create_train_state(init_rng, model, optimizer, config.data.image_size)
  logging.info("Score model: %s parameters, widths %s, %s compute.",
               f"{model_lib.count_params(state.params):,}",
               tuple(config.model.widths), config.model.dtype)

  checkpointer = checkpoint.Checkpointer(
      checkpoint_dir, training.max_checkpoints, delete_partial_saves=True)
  try:
    restored = checkpointer.restore(state, train_rng)
    if restored is not None:
      state, train_rng = restored
    start_step = int(state.step)
    if start_step >= total_steps:
      logging.info("Training already finished (%d of %d steps); skipping.",
                   start_step, total_steps)
      return state
    faults.check_free_space(
        checkpoint_dir, (state, jax.random.key_data(train_rng)),
        training.max_checkpoints)
    with faults.StopSignals() as stop_signals:
      return _train_loop(config, category_dir, train_loader, model, optimizer,
                         learning_rate_fn, state, train_rng, checkpointer,
                         stop_signals)
  finally:
    checkpointer.close()


def _train_loop(config, category_dir, train_loader, model, optimizer,
                learning_rate_fn, state, train_rng, checkpointer,
                stop_signals) -> TrainState:
  """Runs the steps from state.step on; see `train` for the contract."""
  training = config.training
  steps_per_epoch = train_loader.steps_per_epoch
  total_steps = training.num_epochs * steps_per_epoch
  start_step = int(state.step)

  stats_path = os.path.join(category_dir, "train_stats.json")
  stats = {"train_seconds": 0.0, "train_images": 0, "timed_seconds": 0.0}
  if start_step > 0 and os.path.exists(stats_path):
    with open(stats_path) as f:
      stats.update(json.load(f))

  train_step = jax.pmap(
      make_train_step(model, optimizer, learning_rate_fn, training,
                      config.sde.sigma_max),
      axis_name="batch", donate_argnums=(0,))
  state = distributed.replicate(state, "batch")
  replicated_rng = distributed.replicate(train_rng, "batch")
  global_batch = training.batch_size
  logging.info(
      "Training %d steps (%d epochs x %d steps, global batch %d on %d "
      "devices), starting at step %d.", total_steps, training.num_epochs,
      steps_per_epoch, global_batch, jax.device_count(), start_step)

  step = start_step
  run_start = time.perf_counter()
  timer_start, timer_step = None, step
  divergence = faults.DivergenceCheck(checkpointer)

  def save(state) -> tuple[str, dict]:
    """Checks the newest step for NaN and Inf, then saves it and its stats.

    Returns the checkpoint path and the stats written.
    """
    local_state = unreplicate(state)
    divergence.check_latest(local_state)
    path = checkpointer.save(local_state, train_rng)
    # The stats match the checkpoint, so a killed run resumes both.
    current = _updated_stats(stats, step, total_steps, global_batch,
                             start_step, run_start, timer_start, timer_step)
    _write_stats(stats_path, current)
    return path, current

  for epoch in range(start_step // steps_per_epoch, training.num_epochs):
    first_index = max(start_step - epoch * steps_per_epoch, 0)
    for images in train_loader.epoch_batches(epoch, first_index):
      state, metrics = train_step(state, images, replicated_rng)
      step += 1
      divergence.push(step, metrics)

      if timer_start is None:
        # The first step includes compilation; throughput is timed after it.
        jax.block_until_ready(metrics)
        timer_start, timer_step = time.perf_counter(), step
        logging.info("Compiled and ran the first step in %.1f s.",
                     timer_start - run_start)
      if step % training.log_every_steps == 0 or step == total_steps:
        divergence.check_latest()
        _log_step(jax.device_get(unreplicate(metrics)), step, total_steps,
                  epoch, global_batch, (step - timer_step) * global_batch
                  / max(time.perf_counter() - timer_start, 1e-9))
      if step % training.checkpoint_every_steps == 0 and step < total_steps:
        save(state)
      if stop_signals.signal_number is not None and step < total_steps:
        if checkpointer.latest_step() == step:
          path = os.path.join(checkpointer.directory, str(step))
        else:
          path, _ = save(state)
        _stop(stop_signals.signal_number, step, path)

  path, final_stats = save(state)
  logging.info("Training took %s (%.1f images/s after compilation).",
               _format_seconds(final_stats["train_seconds"]),
               final_stats["train_images_per_second"])
  if stop_signals.signal_number is not None:
    # The signal came during the last step or the final save: training is
    # finished, but the process still stops instead of evaluating.
    _stop(stop_signals.signal_number, step, path)
  return unreplicate(state)


def _log_step(metrics, step, total_steps, epoch, global_batch,
              images_per_second) -> None:
  eta = (total_steps - step) * global_batch / max(images_per_second, 1e-9)
  logging.info(
      "step %d/%d  epoch %d  loss %.2f  lr %.2e  %.1f images/s  ETA %s",
      step, total_steps, epoch + 1, metrics["loss"],
      metrics["learning_rate"], images_per_second, _format_seconds(eta))


def _stop(signal_number: int, step: int, path: str) -> None:
  """Logs the checkpoint of step and raises TrainingStopped."""
  logging.warning("Stopped after step %d; checkpoint: %s. Rerun the same "
                  "command to resume.", step, path)
  raise faults.TrainingStopped(signal_number, step, path)


def _updated_stats(stats, step, total_steps, global_batch, start_step,
                   run_start, timer_start, timer_step) -> dict:
  """Returns `stats` of earlier runs plus this run's time up to now.

  Keys: train_seconds (wall time, compilation included), train_images,
  timed_seconds and timed_images (after the first step's compilation),
  train_images_per_second, step and total_steps.
  """
  now = time.perf_counter()
  updated = dict(stats)
  updated["train_seconds"] = stats["train_seconds"] + now - run_start
  updated["train_images"] = stats["train_images"] + (
      step - start_step) * global_batch
  if timer_start is not None and step > timer_step:
    updated["timed_seconds"] = stats["timed_seconds"] + now - timer_start
    updated["timed_images"] = stats.get("timed_images", 0) + (
        step - timer_step) * global_batch
  timed_images = updated.get("timed_images", 0)
  updated["train_images_per_second"] = (
      timed_images / updated["timed_seconds"]
      if updated["timed_seconds"] else 0.0)
  updated["step"] = step
  updated["total_steps"] = total_steps
  return updated


def _write_stats(path: str, stats: dict) -> None:
  """Writes train_stats.json from process 0; other processes write nothing."""
  if distributed.is_primary():
    write_json_atomically(path, stats)


def write_json_atomically(path: str, payload) -> None:
  """Writes payload as JSON to a temporary file, then renames it to path.

  A reader never sees a half-written file, and a crash leaves the old one.
  """
  temporary = path + ".tmp"
  with open(temporary, "w") as f:
    json.dump(payload, f, indent=2, sort_keys=True)
    f.write("\n")
  os.replace(temporary, path)
