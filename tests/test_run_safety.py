"""What a run relies on beyond its checkpoint: the frozen text trunk is verified against the fingerprint the run
recorded, and the tokenizer is safe to share across the input pipeline's threads."""

import concurrent.futures
import json
import os
import pickle
import shutil
import threading

import numpy as np
import pytest

from medbind_jax import inference, runs, train
from medbind_jax.data import text
from test_train import tiny_config
from tiny_data import write_tiny_dataset


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("tiny_data"))
  write_tiny_dataset(data_dir, num_records=16, num_shards=1, splits=("train", "test"))
  config = tiny_config(data_dir, total_steps=2, checkpoint_every=2)
  workdir = str(tmp_path_factory.mktemp("run"))
  train.train_and_evaluate(config, workdir, stop_after_step=2)
  return config, workdir


def test_the_frozen_trunk_is_fingerprinted_and_a_different_one_is_refused(run, tmp_path):
  config, workdir = run
  recorded = json.loads(open(os.path.join(workdir, runs.TEXT_TRUNK_FILE)).read())
  assert len(recorded["fingerprint"]) == 64 and recorded["init"] == "random, seed 0"
  inference.Embedder.load(workdir)  # the same trunk rebuilt: accepted

  # Another trunk where the run's came from (here: another seed draws another random trunk; for a packaged or
  # directory trunk, another version of its weights): loading, evaluating and resuming all refuse it.
  other = str(tmp_path / "other")
  shutil.copytree(workdir, other)
  with open(os.path.join(other, runs.CONFIG_FILE)) as f:
    changed = json.load(f)
  changed["seed"] = 1
  with open(os.path.join(other, runs.CONFIG_FILE), "w") as f:
    json.dump(changed, f)
  message = r"frozen text trunk .* is not the one the run .* trained with .*every text embedding would change"
  with pytest.raises(ValueError, match=message):
    inference.Embedder.load(other)
  with pytest.raises(ValueError, match=message):
    train.evaluate_checkpoint(config, other)
  resumed = runs.load_run_config(other)
  resumed.total_steps = 4
  with pytest.raises(ValueError, match=message):
    train.train_and_evaluate(resumed, other)


def test_params_fingerprint_is_of_the_values():
  a = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.zeros(3, np.float32)}
  same = {"w": a["w"].copy(), "b": a["b"].copy()}
  assert runs.params_fingerprint(a) == runs.params_fingerprint(same)
  moved = {"w": a["w"].copy(), "b": a["b"].copy()}
  moved["w"][1, 2] = np.nextafter(moved["w"][1, 2], np.float32(9))  # one ulp in one weight
  reshaped = {"w": a["w"].reshape(3, 2), "b": a["b"]}
  renamed = {"v": a["w"], "b": a["b"]}
  assert len({runs.params_fingerprint(t) for t in (a, moved, reshaped, renamed)}) == 4


def test_each_thread_has_its_own_tokenizer_and_results_match_serial():
  tokenize = text.Tokenize(text.resolve_pretrained("minilm"), 64)
  texts = [f"Sinus rhythm with {k} premature beats. " * (1 + k % 7) for k in range(64)]
  serial = tokenize(texts)
  seen, lock = {}, threading.Lock()  # thread -> the tokenizer object it used

  def work(k):
    out = tokenize(texts[k:] + texts[:k])
    with lock:
      seen[threading.get_ident()] = id(tokenize.tokenizer)
    return k, out

  with concurrent.futures.ThreadPoolExecutor(8) as pool:
    results = list(pool.map(work, range(64)))
  for k, out in results:
    np.testing.assert_array_equal(out["input_ids"], np.roll(serial["input_ids"], -k, axis=0))
  # A shared fast tokenizer is what fails with "Already borrowed" under concurrent calls; each thread has one.
  assert len(seen) > 1 and len(set(seen.values())) == len(seen)
  copied = pickle.loads(pickle.dumps(tokenize))  # grain workers get a fresh one
  np.testing.assert_array_equal(copied(texts)["input_ids"], serial["input_ids"])
