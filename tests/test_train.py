"""The training loop end to end on a tiny dataset and tiny towers, over the 8 fake CPU devices."""

import json
import logging
import os
import re

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from medbind_jax import train
from medbind_jax.data import tfrecord
from tiny_config import tiny_config  # noqa: F401  (other test modules import it from here)
from tiny_data import write_tiny_dataset


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("tiny_data")
  write_tiny_dataset(d, num_records=32, num_shards=2, splits=("train", "test"))
  return str(d)


def _final_params(workdir, step):
  return ocp.StandardCheckpointer().restore(os.path.join(workdir, "checkpoints", str(step), "state"))["params"]


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {row["step"]: row["loss"] for row in map(json.loads, f)}


def test_resume_equals_uninterrupted_and_compiles_once(data_dir, tmp_path, caplog):
  config = tiny_config(data_dir)
  full, parted = str(tmp_path / "full"), str(tmp_path / "parted")
  jax.config.update("jax_log_compiles", True)
  try:
    with caplog.at_level(logging.WARNING):
      results = train.train_and_evaluate(config, full)
  finally:
    jax.config.update("jax_log_compiles", False)
  compiles = [r for r in caplog.records if "Compiling jit(train_step)" in r.getMessage()]
  assert len(compiles) == 1, [r.getMessage()[:120] for r in compiles]

  # Pre-empted after step 3 (last checkpoint: step 2), then restarted with the same command.
  assert train.train_and_evaluate(config, parted, stop_after_step=3) is None
  assert sorted(os.listdir(os.path.join(parted, "checkpoints"))) == ["2"]
  resumed = train.train_and_evaluate(config, parted)

  want, got = _final_params(full, 6), _final_params(parted, 6)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(want), jax.tree.leaves(got)):
    np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
  # The same data in the same order: every step's loss is identical, and logged once.
  assert _losses(full) == _losses(parted) and sorted(_losses(parted)) == list(range(1, 7))
  assert results == resumed
  assert os.path.exists(os.path.join(full, "metrics.json"))
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(full, "tensorboard")))


def test_frozen_text_trunk_is_left_out_and_text_table_is_used(data_dir, tmp_path, capsys):
  config = tiny_config(data_dir, total_steps=2)
  results = train.train_and_evaluate(config, str(tmp_path))
  # The final retrieval is printed next to chance level, one row per direction.
  printed = capsys.readouterr().out
  assert "R@1 (chance)" in printed
  for direction in ("cxr_to_text", "ecg_to_text", "text_to_cxr", "text_to_ecg", "cxr_to_ecg", "ecg_to_cxr"):
    row = next(line for line in printed.splitlines() if line.startswith(f"| {direction} |"))
    r1 = results[f"retrieval/{direction}/R@1"]
    assert f"{100 * r1:.1f} ({100 * results[f'retrieval/{direction}/chance@1']:.1f})" in row
  params = _final_params(str(tmp_path), 2)
  assert "text" not in params["towers"] and "text" in params["heads"]
  assert any(f.startswith("text_features_") for f in os.listdir(tmp_path / "cache"))


def test_non_finite_loss_stops_with_the_step_and_keeps_last_good_checkpoint(data_dir, tmp_path):
  # Warm-up makes step 1's learning rate 0; the absurd peak rate then blows the parameters up.
  config = tiny_config(data_dir, **{"optim.learning_rate": 1e38, "optim.warmup_steps": 1,
                                    "optim.grad_clip_norm": 0.0, "checkpoint_every": 1, "total_steps": 8})
  with pytest.raises(train.NonFiniteLossError, match=r"at step (\d+)") as err:
    train.train_and_evaluate(config, str(tmp_path))
  bad_step = int(err.value.args[0].split("at step ")[1].split(";")[0])
  kept = sorted(int(s) for s in os.listdir(tmp_path / "checkpoints") if s.isdigit())
  assert kept and max(kept) == bad_step - 1, (kept, bad_step)
  params = _final_params(str(tmp_path), max(kept))
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(params))
  # Not merely finite: parameters near 1e38 (a finite loss, an overflowing update) are not a good checkpoint.
  # The run stops at the first step whose gradient or parameter norm overflows, before saving it.
  assert np.isfinite(float(optax.tree.norm(params))), float(optax.tree.norm(params))
  assert re.search(r"(grad_norm|param_norm|loss) is (inf|nan)", err.value.args[0]), err.value.args[0]


def test_frozen_parameters_stay_bit_identical_with_bf16_and_remat(data_dir, tmp_path):
  # The whole text tower in every step, its embeddings and first layer frozen by regex, the CXR tower on a
  # lower learning rate; model-wide bfloat16 compute and rematerialisation switched on from the config.
  config = tiny_config(data_dir, total_steps=3, checkpoint_every=1, **{
      "model.towers.text.trunk": "train", "model.dtype": "bfloat16", "model.remat": True,
      "model.towers.text.kwargs.num_layers": 2,
      "optim.param_groups": ((r"^towers/text/(embeddings|layer_0)/", None), (r"^towers/cxr/", 0.1))})
  train.train_and_evaluate(config, str(tmp_path))
  first, last = _final_params(str(tmp_path), 1), _final_params(str(tmp_path), 3)
  frozen = moved = 0
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(first), jax.tree.leaves(last)):
    name = jax.tree_util.keystr(path)
    assert a.dtype == np.float32, name  # parameters stay float32 under bf16 compute
    if "'embeddings'" in name or "'layer_0'" in name:
      np.testing.assert_array_equal(a, b, err_msg=name)
      frozen += 1
    elif "['towers']['text']" in name and "'layer_1'" in name and "kernel" in name:
      assert not np.array_equal(a, b), name  # the trainable text layer does learn
      moved += 1
  assert frozen >= 10 and moved >= 4


def test_a_damaged_record_stops_the_run_unless_skipping_is_enabled(tmp_path, caplog):
  data = tmp_path / "data"
  data.mkdir()
  write_tiny_dataset(data, num_records=32, num_shards=2, splits=("train", "test"))
  shard = str(data / "train.tfrecord-00000-of-00002")
  frame = tfrecord.scan_tfrecord(shard).frames[3]
  with open(shard, "r+b") as f:  # one flipped byte inside the 4th record's payload
    f.seek(frame.offset + 7)
    byte = f.read(1)
    f.seek(frame.offset + 7)
    f.write(bytes([byte[0] ^ 0xFF]))
  with pytest.raises(tfrecord.CorruptRecordError, match=rf"{shard}.*{frame.frame_offset}"):
    train.train_and_evaluate(tiny_config(str(data), total_steps=2), str(tmp_path / "strict"))
  with caplog.at_level(logging.WARNING):
    results = train.train_and_evaluate(tiny_config(str(data), total_steps=2, **{"data.skip_corrupt": True}),
                                       str(tmp_path / "skipping"))
  assert results is not None and np.isfinite(results["retrieval/rsum"])
  assert any("1 damaged records skipped" in r.getMessage() for r in caplog.records)


def test_a_sigmoid_edge_trains_with_its_own_bias(data_dir, tmp_path):
  """Edge kinds are config: the CXR-text edge as SigLIP's sigmoid loss, with a learnable bias per edge."""
  config = tiny_config(data_dir, total_steps=2, **{"loss.edges.cxr_text.kind": "sigmoid",
                                                   "eval.evaluators": ("retrieval",)})
  results = train.train_and_evaluate(config, str(tmp_path))
  params = _final_params(str(tmp_path), 2)
  assert set(params["logit_biases"]) == {"cxr_text"} and set(params["logit_scales"]) == {
      "cxr_text", "ecg_text", "cxr_ecg"}
  with open(os.path.join(tmp_path, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  assert rows[0]["logit_bias/cxr_text"] == -10.0  # the value the first step used: its initialisation
  assert float(params["logit_biases"]["cxr_text"]) != -10.0  # and it learns (warm-up: only the 2nd update moves it)
  assert np.isfinite(rows[-1]["loss/cxr_text"]) and rows[-1]["loss/cxr_text"] > 0
  assert 0 <= results["retrieval/cxr_to_text/R@1"] <= 1
