r"""Multimodal prompt tuning: frozen MEDBind embeddings as soft tokens in a LoRA-tuned decoder LLM, for
encounter-level outcomes (the paper's in-hospital mortality and 30-day readmission).

  python main.py --config=configs/prompt_tuning.py:medbind_workdir=workdirs/medbind --workdir=workdirs/pt

Reads top to bottom like `medbind_jax/train.py`: Config check -> Data (the MEDBind run's world, its outcome labels
and patient facts) -> MEDBind embeddings (once per record, cached) -> Prompts -> Model (decoder + LoRA, projector,
head) -> Optimiser, state and update step -> Checkpoint and resume -> Loop -> Evaluation report.

The model. A prompt per (encounter, outcome) (`prompts.py`: patient facts, optionally the written reports and/or
`<cxr>` / `<ecg>` placeholders, the question, the tokenizer's chat template). Each placeholder stands for k token
positions; the projector maps the encounter's frozen MEDBind embedding of that modality (`inference.Embedder` on the
run's checkpoint) through an MLP to k decoder-width vectors, each RMS-normalised and scaled (learned per dimension,
initialised to the RMS of the base's token embeddings, so soft tokens enter at the scale of real ones), and those
vectors replace the token embeddings at exactly the placeholder positions (`insert_soft_tokens`). The decoder runs on
`inputs_embeds`; the answer is scored at the last prompt position, either (scoring = "label_words") as
logit(yes word) - logit(no word) of the next-token distribution, whose binary cross-entropy is exactly the
cross-entropy over the two label words, or (scoring = "head") by a linear head per outcome on the last hidden state.
The loss is that binary cross-entropy, class-balanced by default (each class half the weight, from the training
prevalence), so score > 0 is the decision and balanced accuracy is read at threshold 0.

What trains: LoRA adapters (`lora.py`), the projector and the optional learned prompt tokens, the optional head;
the base is frozen (`lora.partition`-style trainable / frozen trees: the gradient and the optimiser see only the
trainable tree) and may be held in bfloat16 (`model.base_dtype`). Checkpoints hold the trainable tree, the
optimiser state and the step; the frozen base is reloaded from `model.base`. A step's batch is a function of (seed,
step) (`batch_rows`), so a resumed run sees exactly the batches the uninterrupted run would, without iterator state.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import re
from typing import Any, Mapping, Sequence

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import tqdm
from flax import linen as nn
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from medbind_jax import config_check, loop, metric_writer, optim, paths, runs, sharding
from medbind_jax.data import schema, tfrecord
from medbind_jax.evaluators import metrics
from medbind_jax.llm import llama, loading, prompts
from medbind_jax.llm import lora as lora_lib

log = logging.getLogger(__name__)

TASK = "prompt_tuning"
SCORING = ("label_words", "head")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# Short names accepted in config.outcomes for the synthetic world's outcome labels.
OUTCOME_ALIASES = {"mortality": "in_hospital_mortality", "readmission": "readmission_30d"}
FACT_KEYS = ("age", "sex_male", "comorbidity_count")
CHECKPOINT_DIR = "checkpoints"
INPUTS_FILE = "prompt_tuning_inputs.json"  # what a resumed run must reuse: the MEDBind checkpoint step
SIZES_FILE = "sizes.json"  # the run's prompt counts, padded lengths and parameter counts
EVAL_DIR = "eval"


def outcome_names(config) -> tuple[str, ...]:
  """config.outcomes (a tuple, or one '+'-joined string) with aliases resolved."""
  outcomes = config.outcomes
  if isinstance(outcomes, str):
    outcomes = [o for o in outcomes.split("+") if o.strip()]
  return tuple(OUTCOME_ALIASES.get(o.strip(), o.strip()) for o in outcomes)


def arm(config) -> tuple[str, ...]:
  return prompts.parse_arm(config.prompt.inputs)


# ------------------------------------------------------------------------------------------------------------------
# Config check: every mistake found before any work, as a ConfigError naming the fix
# ------------------------------------------------------------------------------------------------------------------


def check_config(config, *, training: bool = True) -> None:
  """Raises config_check.ConfigError on the first mistake in a prompt-tuning config."""
  def fail(message: str):
    raise config_check.ConfigError(f"prompt tuning config: {message}")

  if config.get("task") != TASK:
    fail(f"config.task is {config.get('task')!r}, not {TASK!r}")
  try:
    parts = arm(config)
  except ValueError as err:
    fail(f"prompt.inputs: {err}")
  outcomes = outcome_names(config)
  if not outcomes or len(set(outcomes)) != len(outcomes):
    fail(f"outcomes={config.outcomes!r}: name one or more distinct outcomes (e.g. mortality+readmission)")
  if config.scoring not in SCORING:
    fail(f"scoring={config.scoring!r}; known: {', '.join(SCORING)}")
  for field in ("dtype", "base_dtype"):
    if config.model[field] not in DTYPES:
      fail(f"model.{field}={config.model[field]!r}; known: {', '.join(DTYPES)}")
  modalities = tuple(config.data.modalities)
  if not modalities and ("reports" in parts or "soft" in parts):
    fail("data.modalities is empty but the prompt uses reports or soft tokens: name the modalities (cxr, ecg)")
  try:
    prompts.Templates.from_config(config.prompt).check(parts, modalities, outcomes)
  except ValueError as err:
    fail(str(err))
  if "soft" in parts and config.projector.tokens < 1:
    fail(f"projector.tokens={config.projector.tokens}: soft tokens need k >= 1 per modality")
  if config.lora.rank < 0 or config.projector.learned_tokens < 0:
    fail("lora.rank and projector.learned_tokens must be >= 0")
  if not (config.lora.rank or "soft" in parts or config.projector.learned_tokens or config.scoring == "head"):
    fail("nothing would train: set lora.rank > 0, use soft tokens, learned prompt tokens or scoring=head")
  if config.lora.rank:
    try:
      lora_config(config)
    except (ValueError, re.error) as err:
      fail(f"lora: {err}")
  if "soft" in parts or not config.data.dir:
    workdir = config.medbind_workdir
    if not workdir:
      role = "its embeddings are the soft tokens" if "soft" in parts else "its data.dir is the data (or set data_dir=)"
      fail(f"medbind_workdir is empty: name a trained MEDBind run (configs/prompt_tuning.py:medbind_workdir=DIR); "
           f"{role}")
    if not paths.exists(paths.join(workdir, runs.CONFIG_FILE)):
      fail(f"medbind_workdir={workdir!r} has no {runs.CONFIG_FILE}: is it the workdir of a MEDBind training run?")
    if "soft" in parts:
      steps = runs.checkpoint_steps(workdir)
      if not steps:
        fail(f"medbind_workdir={workdir!r} has no finished checkpoint: train it first (python main.py "
             f"--config=configs/medbind.py --workdir={workdir})")
      if config.medbind_step and config.medbind_step not in steps:
        fail(f"medbind_step={config.medbind_step} is not a checkpoint of {workdir} (steps: {steps}; 0: the latest)")
  base = config.model.base
  if base and not (os.path.isfile(base) if base.endswith(".gguf")
                   else os.path.isfile(os.path.join(base, "config.json"))):
    fail(f"model.base={base!r} is neither a .gguf file nor a Hugging Face directory with config.json ('' : the "
         f"packaged SmolLM2-135M-Instruct, {loading.SMOLLM2_INSTALL})")
  if not base:
    try:
      loading.smollm2_gguf_path()
    except FileNotFoundError as err:
      fail(f"model.base is empty (the packaged SmolLM2) but {err}")
  if training:
    devices = jax.device_count()
    if config.total_steps < 1:
      fail(f"total_steps={config.total_steps}: train at least one step")
    for name, size in (("data.batch_size", config.data.batch_size), ("eval.batch_size", config.eval.batch_size)):
      if size < 1 or size % devices:
        fail(f"{name}={size} must be a positive multiple of the {devices} devices (each holds its rows)")
  try:
    sharding.mesh_shape(config.mesh, jax.device_count())
  except ValueError as err:
    fail(str(err))


def lora_config(config) -> lora_lib.LoraConfig | None:
  c = config.lora
  return lora_lib.LoraConfig(targets=c.targets, rank=int(c.rank), alpha=float(c.alpha),
                             dropout=float(c.dropout)) if c.rank else None


# ------------------------------------------------------------------------------------------------------------------
# Data: the encounters of a split that have every modality, with patient facts and outcome labels
# ------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Encounters:
  """One split's usable encounters (every modality of data.modalities present), in shard order."""

  ids: list[str]
  inputs: list[prompts.PromptInputs]
  labels: np.ndarray  # [N, num_outcomes] float32: 1 event, 0 none, -1 not applicable
  payloads: dict[str, list]  # modality -> record payloads (for embedding; emptied afterwards)


def prepare_data(config, medbind_config) -> str:
  """The data directory (config.data.dir, else the MEDBind run's), made current: a synthetic world generated by an
  older generator (no outcome labels) is regenerated in place with its own parameters (the images, ECGs and reports
  come out byte-identical; `data_prep/synthetic_world.py`). Raises ConfigError when the data has no outcomes."""
  data_dir = config.data.dir or medbind_config.data.dir
  if not paths.exists(paths.join(data_dir, schema.DATASET_INFO)) and medbind_config is not None \
      and not config.data.dir and medbind_config.data.get("synthetic"):
    from medbind_jax import train  # pylint: disable=import-outside-toplevel
    train.prepare_data(medbind_config)  # the world the MEDBind run trained on, generated as it would be
  if not paths.exists(paths.join(data_dir, schema.DATASET_INFO)):
    raise config_check.ConfigError(f"prompt tuning: no {schema.DATASET_INFO} in {data_dir!r} (data.dir or the "
                                   "MEDBind run's data.dir): point data_dir= at converted shards")
  info = schema.read_dataset_info(data_dir)
  from data_prep import synthetic_world  # pylint: disable=import-outside-toplevel
  if info.get("name") == synthetic_world.DATASET_NAME and "params" in info:
    params = synthetic_world.WorldParams(**{k: tuple(v) if isinstance(v, list) else v
                                            for k, v in info["params"].items()})
    if info.get("fingerprint") != synthetic_world.fingerprint(params):
      log.info("the synthetic world in %s is from generator version %s: regenerating it at version %s (same "
               "images, ECGs and reports; adds the outcome labels)", data_dir, info.get("generator_version"),
               synthetic_world.GENERATOR_VERSION)
      multihost_utils.sync_global_devices("prompt tuning world: start")
      if jax.process_index() == 0:
        synthetic_world.ensure_world(data_dir, params)
      multihost_utils.sync_global_devices("prompt tuning world: ready")
      info = schema.read_dataset_info(data_dir)
  known = info.get("outcomes", {})
  missing = [o for o in outcome_names(config) if o not in known]
  if missing:
    raise config_check.ConfigError(
        f"prompt tuning: {data_dir} has no outcome labels {missing} (dataset_info.json 'outcomes' lists "
        f"{sorted(known) or 'none'}; short names: {OUTCOME_ALIASES}). The synthetic world has them from generator "
        "version 2 on; other data needs encounter-level labels in each record's extra/outcome_<name>")
  for split in (config.data.train_split, config.data.eval_split):
    if split not in info["splits"]:
      raise config_check.ConfigError(f"prompt tuning: {data_dir} has no split {split!r} (splits: "
                                     f"{sorted(info['splits'])}); set data.train_split / data.eval_split")
  return data_dir


def read_encounters(data_dir: str, split: str, modalities: Sequence[str], outcomes: Sequence[str], *,
                    max_records: int = 0) -> Encounters:
  """The encounters of `split` that have every one of `modalities`, read once from the shards (with their extras).
  `max_records` > 0 keeps a fixed subset of that many (the same whatever the seed or arm: drawn with seed 0)."""
  info = schema.read_dataset_info(data_dir)
  extra_keys = {o: info["outcomes"][o]["extra"] for o in outcomes}
  ids, inputs, labels = [], [], []
  payloads: dict[str, list] = {m: [] for m in modalities}
  for shard in info["splits"][split]["shards"]:
    path = paths.join(data_dir, shard["file"])
    for _, data in tfrecord.iter_records(path):
      enc = schema.decode_encounter(data, modalities=modalities)
      if not all(enc.has(m) for m in modalities):
        continue
      absent = [k for k in (*FACT_KEYS, *extra_keys.values()) if k not in enc.extras]
      if absent:
        raise ValueError(f"{path}: record {enc.encounter_id} lacks extra/{', extra/'.join(absent)} (patient facts "
                         "and outcome labels): regenerate or re-convert the data")
      ids.append(enc.encounter_id)
      inputs.append(prompts.PromptInputs(facts={k: float(enc.extras[k][0]) for k in FACT_KEYS},
                                         reports={m: enc.part(m).report for m in modalities}))
      labels.append([float(enc.extras[extra_keys[o]][0]) for o in outcomes])
      for m in modalities:
        payloads[m].append(enc.part(m).data)
  if not ids:
    raise config_check.ConfigError(f"prompt tuning: {data_dir} split {split!r} has no record with all of "
                                   f"{list(modalities)} (data.modalities)")
  keep = np.arange(len(ids))
  if max_records and len(ids) > max_records:
    keep = np.sort(np.random.default_rng(0).permutation(len(ids))[:max_records])
  return Encounters(ids=[ids[i] for i in keep], inputs=[inputs[i] for i in keep],
                    labels=np.asarray(labels, np.float32).reshape(len(ids), len(outcomes))[keep],
                    payloads={m: [v[i] for i in keep] for m, v in payloads.items()})


# ------------------------------------------------------------------------------------------------------------------
# MEDBind embeddings: computed once per record through the inference API, cached on disk
# ------------------------------------------------------------------------------------------------------------------


class LazyEmbedder:
  """The MEDBind run's `inference.Embedder`, loaded on first use (not at all when every embedding is cached)."""

  def __init__(self, workdir: str, step: int, batch_size: int):
    self.workdir, self.step, self.batch_size, self._embedder = workdir, step, batch_size, None

  def get(self):
    if self._embedder is None:
      from medbind_jax import inference  # pylint: disable=import-outside-toplevel
      self._embedder = inference.Embedder.load(self.workdir, self.step, batch_size=self.batch_size)
    return self._embedder


def medbind_embeddings(embedder: LazyEmbedder, encounters: Encounters, modalities: Sequence[str],
                       cache_dir: str) -> np.ndarray:
  """[N, len(modalities), d] float32 unit vectors: each encounter's MEDBind embedding per modality, from checkpoint
  `embedder.step` of `embedder.workdir` (`inference.Embedder`, the evaluation preprocessing). Cached in `cache_dir`
  under a key of the run, the step, the modalities and the encounters' ids, so every arm and seed of a comparison
  embeds once."""
  key = json.dumps([paths.absolute(embedder.workdir), int(embedder.step), list(modalities), encounters.ids])
  path = paths.join(cache_dir, f"medbind_embeddings_{hashlib.sha256(key.encode()).hexdigest()[:20]}.npy")
  if paths.exists(path):
    with paths.open_file(path, "rb") as f:
      return np.load(f)
  columns = []
  for m in modalities:
    items, options = encounters.payloads[m], {}
    if m == "ecg":  # records as arrays in mV with their own rates; leads by name
      leads = {tuple(p.leads) for p in items}
      if len(leads) != 1:
        raise ValueError(f"ECG records with different lead sets {sorted(leads)}: embed them in groups")
      options = {"sampling_rate": [float(p.sampling_rate) for p in items], "leads": list(leads.pop())}
      items = [p.signal_mv(name) for p, name in zip(items, encounters.ids)]
    columns.append(embedder.get().embed(m, items, names=[f"{i}/{m}" for i in encounters.ids], progress=True,
                                  **options).embeddings)
  table = np.stack(columns, axis=1).astype(np.float32)
  if jax.process_index() == 0:
    paths.makedirs(cache_dir)
    buffer = io.BytesIO()
    np.save(buffer, table)
    paths.write_bytes_atomic(path, buffer.getvalue())
  return table


# ------------------------------------------------------------------------------------------------------------------
# Model: projector, soft-token insertion, scoring
# ------------------------------------------------------------------------------------------------------------------


class Projector(nn.Module):
  """Frozen embeddings [B, M, d] -> the soft-token table [B, M * tokens + num_learned, width]: per modality an MLP
  (d -> hidden -> tokens * width, GELU), then the learned prompt tokens; every row RMS-normalised and multiplied by
  `scale` [width] (initialised to `token_rms`, the RMS of the base's token embeddings)."""

  num_modalities: int
  tokens: int
  width: int
  hidden: int
  num_learned: int = 0
  token_rms: float = 1.0

  @nn.compact
  def __call__(self, embeddings):
    batch = embeddings.shape[0]
    rows = []
    for i in range(self.num_modalities):
      h = nn.gelu(nn.Dense(self.hidden, name=f"hidden_{i}")(embeddings[:, i]))
      rows.append(nn.Dense(self.tokens * self.width, name=f"tokens_{i}")(h).reshape(batch, self.tokens, self.width))
    if self.num_learned:
      learned = self.param("learned_tokens", nn.initializers.normal(1.0), (self.num_learned, self.width))
      rows.append(jnp.broadcast_to(learned[None], (batch, self.num_learned, self.width)))
    table = jnp.concatenate(rows, axis=1).astype(jnp.float32)
    table = table * jax.lax.rsqrt(jnp.mean(jnp.square(table), axis=-1, keepdims=True) + 1e-6)
    scale = self.param("scale", nn.initializers.constant(self.token_rms), (self.width,))
    return table * scale


def insert_soft_tokens(token_embeds, soft, slots):
  """token_embeds [B, T, W] with every position whose slot [B, T] is >= 0 replaced by soft[b, slot] ([B, S, W]):
  a select, so the other positions keep their token embeddings bit for bit."""
  gathered = jnp.take_along_axis(soft.astype(token_embeds.dtype), jnp.maximum(slots, 0)[..., None], axis=1)
  return jnp.where((slots >= 0)[..., None], gathered, token_embeds)


def _output_logits(module: llama.Llama, hidden):
  """The decoder's output layer (tied embedding or lm_head, LoRA included) on hidden [B, W]: [B, vocab]."""
  if module.config.tie_word_embeddings:
    return module.embed_tokens.attend(hidden)
  return module.lm_head(hidden, True)


@dataclasses.dataclass(frozen=True)
class PromptTuner:
  """The scoring function over one parameter tree {"decoder", "projector"?, "head"?}."""

  decoder: llama.Llama
  projector: Projector | None
  head: nn.Dense | None  # scoring = "head": one score per outcome
  label_ids: tuple[int, int] | None  # scoring = "label_words": (yes, no) token ids

  def inputs_embeds(self, params, batch):
    """[B, T, W]: token embeddings with the soft tokens at their slots."""
    embeds = self.decoder.apply({"params": params["decoder"]}, batch["ids"], method="embed")
    if self.projector is None:
      return embeds
    soft = self.projector.apply({"params": params["projector"]}, batch["embeddings"])
    return insert_soft_tokens(embeds, soft, batch["slots"])

  def scores(self, params, batch, *, train: bool = False, rng=None):
    """[B] float32: the answer's score at each prompt's last position (see the module docstring)."""
    out = self.decoder.apply({"params": params["decoder"]}, inputs_embeds=self.inputs_embeds(params, batch),
                             attention_mask=batch["mask"], train=train,
                             rngs={"dropout": rng} if train and rng is not None else None)
    rows = jnp.arange(batch["ids"].shape[0])
    hidden = out["hidden"][rows, batch["last"]]  # [B, W]; XLA drops the unused full-length logits
    if self.head is not None:
      per_outcome = self.head.apply({"params": params["head"]}, hidden.astype(jnp.float32))
      return per_outcome[rows, batch["outcome"]]
    logits = self.decoder.apply({"params": params["decoder"]}, hidden, method=_output_logits).astype(jnp.float32)
    yes, no = self.label_ids
    return logits[:, yes] - logits[:, no]


def bce_loss(scores, labels, weights):
  """Weighted mean binary cross-entropy of scores (logits) [B]; with scores = logit(yes) - logit(no) this is the
  cross-entropy over the two label words."""
  losses = optax.sigmoid_binary_cross_entropy(scores, labels)
  return jnp.sum(weights * losses) / jnp.maximum(jnp.sum(weights), 1e-9)


# ------------------------------------------------------------------------------------------------------------------
# Examples and batches
# ------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Examples:
  """One prompt per (encounter, outcome) with a defined label: the model inputs as host arrays."""

  tokens: prompts.TokenTable
  record: np.ndarray  # [N] row of the encounter in `embeddings`
  outcome: np.ndarray  # [N] outcome index
  label: np.ndarray  # [N] float32 0/1
  weight: np.ndarray  # [N] float32 loss weight
  embeddings: np.ndarray  # [num_records, M, d] (M = 0 without soft tokens)
  encounter_ids: list[str]

  def __len__(self) -> int:
    return len(self.record)

  def batch(self, rows: np.ndarray) -> dict[str, np.ndarray]:
    t = self.tokens
    return {"ids": t.ids[rows], "slots": t.slots[rows], "mask": t.mask[rows], "last": t.lengths[rows] - 1,
            "outcome": self.outcome[rows], "label": self.label[rows], "weight": self.weight[rows],
            "embeddings": self.embeddings[self.record[rows]]}


def build_examples(encounters: Encounters, embeddings: np.ndarray, modalities: Sequence[str],
                   outcomes: Sequence[str], tokenizer, templates: prompts.Templates, parts: Sequence[str],
                   layout: prompts.SoftLayout, *, class_weights: np.ndarray, max_length: int = 0) -> Examples:
  """Prompts for every (encounter, outcome) whose label is 0 or 1 (e.g. readmission is not applicable after an
  in-hospital death); `class_weights` [num_outcomes, 2] weight (negative, positive) labels."""
  filler_id, pad_id = prompts.filler_and_pad_ids(tokenizer)
  encoded, record, outcome, label = [], [], [], []
  for i, example in enumerate(encounters.inputs):
    for o, name in enumerate(outcomes):
      y = encounters.labels[i, o]
      if y not in (0.0, 1.0):
        continue
      text = prompts.chat_text(tokenizer, prompts.user_message(example, name, templates, parts, list(modalities),
                                                               layout.num_learned), templates.system)
      encoded.append(prompts.encode(tokenizer, text, layout, filler_id))
      record.append(i)
      outcome.append(o)
      label.append(y)
  outcome_arr, label_arr = np.asarray(outcome, np.int32), np.asarray(label, np.float32)
  return Examples(tokens=prompts.pad_table(encoded, pad_id, max_length=max_length), record=np.asarray(record, np.int32),
                  outcome=outcome_arr, label=label_arr,
                  weight=class_weights[outcome_arr, label_arr.astype(np.int32)].astype(np.float32),
                  embeddings=embeddings, encounter_ids=list(encounters.ids))


def class_weights(labels: np.ndarray, balance: bool) -> np.ndarray:
  """[num_outcomes, 2] loss weights of (negative, positive) labels: 0.5 / share of the class (both classes weigh
  half of the loss) when `balance`, else ones. labels [N, num_outcomes] (-1: not applicable, ignored)."""
  weights = np.ones((labels.shape[1], 2), np.float32)
  if balance:
    for o in range(labels.shape[1]):
      defined = labels[:, o][labels[:, o] >= 0]
      positive = float(np.mean(defined)) if defined.size else 0.5
      if 0.0 < positive < 1.0:
        weights[o] = (0.5 / (1.0 - positive), 0.5 / positive)
  return weights


def batch_rows(num_examples: int, batch_size: int, seed: int, step: int) -> np.ndarray:
  """Rows of training step `step` (1-based): epoch e is a permutation drawn from (seed, e), and step s takes
  positions (s - 1) B .. s B - 1 of the epochs laid end to end. A function of (seed, step) alone, so a resumed run
  sees exactly the batches of the uninterrupted one, with no iterator state to save."""
  positions = np.arange((step - 1) * batch_size, step * batch_size)
  epochs = positions // num_examples
  rows = np.empty(batch_size, np.int64)
  for epoch in np.unique(epochs):
    order = np.random.default_rng([seed, int(epoch)]).permutation(num_examples)
    rows[epochs == epoch] = order[positions[epochs == epoch] % num_examples]
  return rows


# ------------------------------------------------------------------------------------------------------------------
# Building a run: base, tokenizer, model, parameters
# ------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Run:
  """Everything a run's training and evaluation share."""

  config: Any
  tuner: PromptTuner
  tokenizer: Any
  frozen: Any  # {"decoder": base parameters}, on the mesh
  initial: Any  # the trainable tree at init {"decoder": adapters?, "projector"?, "head"?}
  mesh: Any
  layout: prompts.SoftLayout
  outcomes: tuple[str, ...]
  embedder: LazyEmbedder | None = None  # the MEDBind run's, when the prompt has soft tokens


def load_base(config, mesh):
  """(Llama module with LoRA, frozen base parameters on `mesh`, tokenizer) of config.model.base."""
  base = config.model.base or loading.smollm2_gguf_path()
  kwargs = dict(dtype=DTYPES[config.model.dtype], param_dtype=DTYPES[config.model.base_dtype],
                lora=lora_config(config), mesh=mesh)
  pretrained = loading.load_gguf(base, **kwargs) if base.endswith(".gguf") else loading.load_hf(base, **kwargs)
  tokenizer = pretrained.tokenizer
  if config.model.get("tokenizer"):
    import transformers  # pylint: disable=import-outside-toplevel
    tokenizer = transformers.AutoTokenizer.from_pretrained(config.model.tokenizer, local_files_only=True)
  if tokenizer is None:
    raise config_check.ConfigError(f"prompt tuning: model.base={base!r} has no tokenizer; set model.tokenizer to a "
                                   "local tokenizer directory")
  if getattr(tokenizer, "chat_template", None) is None:
    raise config_check.ConfigError(f"prompt tuning: the tokenizer of {base!r} has no chat template; use an "
                                   "instruction-tuned base or a tokenizer directory with one (model.tokenizer)")
  return pretrained.model, pretrained.params, tokenizer


def build_run(config, *, embed_dim: int | None) -> Run:
  """Mesh, base, tokenizer, tuner and initial trainable parameters (from config.seed)."""
  mesh = sharding.make_mesh(config.mesh)
  decoder, base_params, tokenizer = load_base(config, mesh)
  parts, outcomes = arm(config), outcome_names(config)
  soft_modalities = tuple(config.data.modalities) if "soft" in parts else ()
  layout = prompts.SoftLayout(soft_modalities, int(config.projector.tokens), int(config.projector.learned_tokens))
  width = decoder.config.hidden_size
  embedding = base_params["embed_tokens"]["embedding"]
  token_rms = float(jax.jit(lambda e: jnp.sqrt(jnp.mean(jnp.square(e.astype(jnp.float32)))))(embedding))
  projector = None
  if layout.size:
    projector = Projector(len(soft_modalities), layout.tokens, width, int(config.projector.hidden),
                          layout.num_learned, token_rms)
  head, label_ids = None, None
  if config.scoring == "head":
    head = nn.Dense(len(outcomes), kernel_init=nn.initializers.zeros)
  else:
    try:
      label_ids = prompts.label_token_ids(tokenizer, config.prompt.label_words)
    except ValueError as err:
      raise config_check.ConfigError(f"prompt tuning: {err}") from None
    if max(label_ids) >= decoder.config.vocab_size:
      raise config_check.ConfigError(f"prompt tuning: the tokenizer's label word ids {label_ids} exceed the base's "
                                     f"vocabulary of {decoder.config.vocab_size}: model.tokenizer must be the base's")
  tuner = PromptTuner(decoder, projector, head, label_ids)

  key_lora, key_projector, key_head = jax.random.split(jax.random.key(config.seed), 3)
  initial: dict[str, Any] = {}
  if decoder.lora is not None:  # adapters in float32 whatever the base's storage dtype
    initial["decoder"] = lora_lib.init_adapters(
        decoder.clone(config=decoder.config.replace(param_dtype=jnp.float32)), key_lora)
  if projector is not None:
    initial["projector"] = projector.init(key_projector, jnp.zeros((1, len(soft_modalities), embed_dim or 1)))["params"]
  if head is not None:
    initial["head"] = head.init(key_head, jnp.zeros((1, width)))["params"]
  mesh_config = {"fsdp_min_size": config.mesh.get("fsdp_min_size", 1 << 14)}
  initial = jax.device_put(initial, sharding.param_shardings(initial, mesh, mesh_config))
  return Run(config=config, tuner=tuner, tokenizer=tokenizer, frozen={"decoder": base_params}, initial=initial,
             mesh=mesh, layout=layout, outcomes=outcomes)


# ------------------------------------------------------------------------------------------------------------------
# Optimiser, state and update step
# ------------------------------------------------------------------------------------------------------------------


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any  # the trainable tree
  opt_state: Any


def build_train_step(config, run: Run):
  """(initial TrainState, jitted step (state, frozen, batch) -> (state, metrics)). Only the trainable tree is
  differentiated and updated; the frozen base is an input the step never writes. The state is donated."""
  tx, schedule = optim.make_optimizer(config, run.initial)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=run.initial, opt_state=tx.init(run.initial))
  replicated = NamedSharding(run.mesh, P())
  param_shardings = jax.tree.map(lambda x: x.sharding, run.initial)
  state_shardings = TrainState(step=replicated, params=param_shardings,
                               opt_state=sharding.like_params(state.opt_state, run.initial, param_shardings, run.mesh))
  frozen_shardings = jax.tree.map(lambda x: x.sharding, run.frozen)
  dropout_key = jax.random.fold_in(jax.random.key(config.seed), 1)

  def loss_fn(trainable, frozen, batch, rng):
    params = lora_lib.combine(trainable, frozen)
    scores = run.tuner.scores(params, batch, train=True, rng=rng)
    return bce_loss(scores, batch["label"], batch["weight"])

  def train_step(state, frozen, batch):
    rng = jax.random.fold_in(dropout_key, state.step)
    loss, grads = jax.value_and_grad(loss_fn)(state.params, frozen, batch, rng)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # A finite loss can come with an overflowing gradient or parameters: all three are checked before a save.
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "param_norm": optax.tree.norm(params),
               "learning_rate": schedule(state.step)}
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

  step = jax.jit(train_step, in_shardings=(state_shardings, frozen_shardings, sharding.batch_sharding(run.mesh)),
                 out_shardings=(state_shardings, replicated), donate_argnums=(0,))
  return jax.device_put(state, state_shardings), step


def make_score_fn(run: Run):
  """Jitted (trainable, frozen, batch) -> scores [B] (no dropout)."""
  return jax.jit(lambda trainable, frozen, batch: run.tuner.scores(lora_lib.combine(trainable, frozen), batch))


def _put(batch: Mapping[str, np.ndarray], mesh) -> dict[str, jax.Array]:
  """Host arrays (the global batch, the same on every process) -> global arrays split by rows over the mesh."""
  spec = sharding.batch_sharding(mesh)
  return {k: jax.make_array_from_callback(v.shape, spec, lambda index, v=v: v[index]) for k, v in batch.items()}


# ------------------------------------------------------------------------------------------------------------------
# Evaluation
# ------------------------------------------------------------------------------------------------------------------


def predict(score_fn, trainable, frozen, examples: Examples, batch_size: int, mesh, *, progress: bool = False
            ) -> np.ndarray:
  """Scores [N] of every example, in fixed-size batches (the last one padded with row 0, its extra scores dropped)."""
  scores = np.zeros(len(examples), np.float32)
  for start in tqdm.trange(0, len(examples), batch_size, desc="eval", unit="batch", leave=False,
                           disable=not progress):
    rows = np.arange(start, min(start + batch_size, len(examples)))
    padded = np.concatenate([rows, np.zeros(batch_size - len(rows), np.int64)])
    out = score_fn(trainable, frozen, _put(examples.batch(padded), mesh))
    scores[rows] = np.asarray(jax.device_get(out))[:len(rows)]
  return scores


def outcome_metrics(examples: Examples, scores: np.ndarray, outcomes: Sequence[str]) -> dict[str, float]:
  """Per outcome: AUROC, balanced accuracy at score > 0, examples, prevalence (NaN AUROC / balanced accuracy when
  the split holds one class only)."""
  results: dict[str, float] = {}
  for o, name in enumerate(outcomes):
    rows = examples.outcome == o
    y, s = examples.label[rows].astype(np.int32), scores[rows]
    results[f"{name}/num_examples"] = float(rows.sum())
    results[f"{name}/prevalence"] = float(y.mean()) if rows.any() else float("nan")
    both = rows.any() and 0 < y.sum() < len(y)
    results[f"{name}/auroc"] = metrics.auroc(y, s) if both else float("nan")
    results[f"{name}/balanced_accuracy"] = (metrics.balanced_accuracy(y, (s > 0).astype(np.int32), num_classes=2)
                                            if both else float("nan"))
  return results


def _fmt(value: float) -> str:
  return "n/a" if not np.isfinite(value) else f"{value:.3f}"


def report_markdown(results: Mapping[str, float], run: Run, *, step: int, split: str, example_prompt: str) -> str:
  config = run.config
  lines = [f"# Prompt tuning evaluation (step {step}, split `{split}`)", "",
           f"- base: `{config.model.base or loading.SMOLLM2_FILE}` (compute {config.model.dtype}, frozen base "
           f"{config.model.base_dtype}); LoRA {config.lora.to_dict() if config.lora.rank else 'none'}",
           f"- prompt inputs: `{config.prompt.inputs}`; scoring: `{config.scoring}`; MEDBind run: "
           f"`{config.medbind_workdir or '-'}`" + (f" step {run.embedder.step}" if run.embedder else ""),
           f"- steps {config.total_steps}, batch {config.data.batch_size}, seed {config.seed}", "",
           "| outcome | examples | prevalence | AUROC | balanced accuracy (score > 0) |", "|---|---:|---:|---:|---:|"]
  for name in run.outcomes:
    lines.append(f"| {name} | {int(results[f'{name}/num_examples'])} | {_fmt(results[f'{name}/prevalence'])} | "
                 f"{_fmt(results[f'{name}/auroc'])} | {_fmt(results[f'{name}/balanced_accuracy'])} |")
  lines += ["", "AUROC or balanced accuracy n/a: the split holds one class of that outcome only.", "",
            "An evaluated prompt (soft-token positions as [slot n]):", "", "```", example_prompt, "```", ""]
  return "\n".join(lines)


def write_report(workdir: str, results: Mapping[str, float], run: Run, examples: Examples, scores: np.ndarray, *,
                 step: int, split: str) -> None:
  """workdir/eval/{metrics.json, report.md, scores.csv} and workdir/metrics.json (process 0)."""
  if jax.process_index() != 0:
    return
  out = paths.join(workdir, EVAL_DIR)
  paths.makedirs(out)
  paths.write_text_atomic(paths.join(out, "metrics.json"), json.dumps({"step": step, **results}, indent=2,
                                                                      sort_keys=True))
  paths.write_text_atomic(paths.join(workdir, "metrics.json"), json.dumps(dict(results), indent=2, sort_keys=True))
  example = prompts.describe(examples.tokens, run.tokenizer, 0)
  paths.write_text_atomic(paths.join(out, "report.md"),
                          report_markdown(results, run, step=step, split=split, example_prompt=example))
  rows = ["encounter_id,outcome,label,score"] + [
      f"{examples.encounter_ids[r]},{run.outcomes[o]},{int(y)},{s:.6g}"
      for r, o, y, s in zip(examples.record, examples.outcome, examples.label, scores)]
  paths.write_text_atomic(paths.join(out, "scores.csv"), "\n".join(rows) + "\n")


# ------------------------------------------------------------------------------------------------------------------
# The recipe
# ------------------------------------------------------------------------------------------------------------------


def _medbind_config(config):
  return runs.load_run_config(config.medbind_workdir) if config.medbind_workdir else None


def _pinned_medbind_step(config, workdir: str) -> int:
  """The MEDBind checkpoint step of the soft tokens: recorded in workdir at the first start and reused on resume
  (a MEDBind run that trained on meanwhile does not change a resumed run's inputs)."""
  path = paths.join(workdir, INPUTS_FILE)
  if paths.exists(path):
    return int(json.loads(paths.read_text(path))["medbind_step"])
  step = int(config.medbind_step or runs.checkpoint_steps(config.medbind_workdir)[-1])
  if jax.process_index() == 0:
    paths.write_text_atomic(path, json.dumps({"medbind_workdir": config.medbind_workdir, "medbind_step": step}))
  return step


def load_split(config, run: Run, data_dir: str, split: str, cache_dir: str, *, max_records: int,
               training: bool) -> tuple[Examples, Encounters]:
  """The examples of one split (MEDBind embeddings included when the prompt has soft tokens); the loss weights
  of a training split balance its classes (loss.class_balance), an evaluation split's are ones."""
  modalities = tuple(config.data.modalities)
  encounters = read_encounters(data_dir, split, modalities, run.outcomes, max_records=max_records)
  embeddings = np.zeros((len(encounters.ids), 0, 1), np.float32)
  if run.layout.modalities:
    embeddings = medbind_embeddings(run.embedder, encounters, run.layout.modalities, cache_dir)
  encounters.payloads = {m: [] for m in modalities}  # the images and waveforms are no longer needed
  weights = class_weights(encounters.labels, training and bool(config.loss.class_balance))
  try:
    examples = build_examples(encounters, embeddings, modalities, run.outcomes, run.tokenizer,
                              prompts.Templates.from_config(config.prompt), arm(config), run.layout,
                              class_weights=weights, max_length=int(config.prompt.max_length))
  except ValueError as err:
    raise config_check.ConfigError(f"prompt tuning: {err}") from None
  return examples, encounters


def _embed_dim(config) -> int | None:
  if "soft" not in arm(config):
    return None
  return int(_medbind_config(config).model.embed_dim)


def checkpoint_manager(workdir: str, config) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints, create=True)
  return ocp.CheckpointManager(runs.workdir_path(workdir) / CHECKPOINT_DIR, options=options, item_names=("state",),
                               item_handlers={"state": ocp.StandardCheckpointHandler()})


NonFiniteLossError = loop.NonFiniteLossError  # one exception type for both trainers


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       stop_after_step: int | None = None) -> dict[str, float] | None:
  """Trains (or resumes) the prompt tuner of `config` in `workdir` and evaluates it on data.eval_split.

  Returns the evaluation metrics (also in workdir/eval/metrics.json and workdir/metrics.json), or None when stopped
  early by `stop_after_step` (right after that step, without saving, as a pre-emption would).
  Raises config_check.ConfigError on a config mistake, before anything is written.
  """
  check_config(config)
  is_main = jax.process_index() == 0
  paths.makedirs(workdir)
  if is_main:
    paths.write_text_atomic(paths.join(workdir, runs.CONFIG_FILE),
                            config.to_json_best_effort(indent=2, sort_keys=True))
  writer = metric_writer.MetricWriter(workdir)
  try:
    return _train_and_evaluate(config, workdir, writer, stop_after_step)
  finally:
    writer.close()


def _train_and_evaluate(config, workdir: str, writer: metric_writer.MetricWriter, stop_after_step: int | None):
  is_main = jax.process_index() == 0
  cache = config.get("cache_dir") or paths.join(workdir, "cache")

  # ---- Data ------------------------------------------------------------------------------------------------------
  # The MEDBind run's data (its synthetic world brought to the current generator), the train and eval encounters
  # that have every modality, their MEDBind embeddings (once, cached) and one prompt per (encounter, outcome).
  data_dir = prepare_data(config, _medbind_config(config))

  # ---- Model -----------------------------------------------------------------------------------------------------
  run = build_run(config, embed_dim=_embed_dim(config))
  if "soft" in arm(config):
    run.embedder = LazyEmbedder(config.medbind_workdir, _pinned_medbind_step(config, workdir),
                                int(config.data.embed_batch_size))
  train_examples, train_encounters = load_split(config, run, data_dir, config.data.train_split, cache,
                                                max_records=int(config.data.max_train_records), training=True)
  eval_examples, _ = load_split(config, run, data_dir, config.data.eval_split, cache,
                                max_records=int(config.data.max_eval_records), training=False)
  log.info("prompt tuning: %d training prompts (%d encounters, %d tokens each), %d evaluation prompts; e.g.\n%s",
           len(train_examples), len(train_encounters.ids), train_examples.tokens.ids.shape[1], len(eval_examples),
           prompts.describe(train_examples.tokens, run.tokenizer, 0))

  # ---- Optimiser, state and update step --------------------------------------------------------------------------
  state, train_step = build_train_step(config, run)
  score_fn = make_score_fn(run)
  sizes = {"train_prompts": len(train_examples), "train_encounters": len(train_encounters.ids),
           "train_tokens": int(train_examples.tokens.ids.shape[1]), "eval_prompts": len(eval_examples),
           "eval_tokens": int(eval_examples.tokens.ids.shape[1]),
           "trainable_params": int(sum(x.size for x in jax.tree.leaves(state.params))),
           "frozen_params": int(sum(x.size for x in jax.tree.leaves(run.frozen)))}
  log.info("trainable parameters: %.3fM (frozen base: %.1fM)", sizes["trainable_params"] / 1e6,
           sizes["frozen_params"] / 1e6)
  if is_main:
    paths.write_text_atomic(paths.join(workdir, SIZES_FILE), json.dumps(sizes, indent=2))

  # ---- Checkpoint and resume -------------------------------------------------------------------------------------
  # The trainable tree, optimiser state and step; the data position is the step itself (batch_rows).
  manager = checkpoint_manager(workdir, config)
  if manager.latest_step() is not None:
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    state = manager.restore(manager.latest_step(),
                            args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))["state"]
    writer.truncate_after(int(state.step))
    log.info("resumed from step %d of %s", int(state.step), manager.directory)
  start_step = int(state.step)

  # ---- Loop ------------------------------------------------------------------------------------------------------
  # `loop.run_steps`: a step's loss is read while the next one runs; a non-finite one stops the run unsaved.
  batch_size = int(config.data.batch_size)
  state, finished = loop.run_steps(
      state, step_fn=lambda state, batch: train_step(state, run.frozen, batch),
      next_batch=lambda step: _put(train_examples.batch(batch_rows(len(train_examples), batch_size, config.seed,
                                                                   step)), run.mesh),
      start_step=start_step, total_steps=config.total_steps, manager=manager,
      save=lambda step, state: manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state))),
      writer=writer, log_every=config.log_every, checkpoint_every=config.checkpoint_every,
      examples_per_step=batch_size, desc="prompt tuning", stop_after_step=stop_after_step)
  if not finished:
    return None

  # ---- Evaluation report -----------------------------------------------------------------------------------------
  results = evaluate(run, score_fn, state.params, eval_examples, workdir, step=config.total_steps)
  writer.write(config.total_steps, {f"eval/{k}": v for k, v in results.items()})
  return results


def evaluate(run: Run, score_fn, trainable, examples: Examples, workdir: str, *, step: int) -> dict[str, float]:
  """Scores the evaluation prompts, writes the report and prints its table."""
  config = run.config
  scores = predict(score_fn, trainable, run.frozen, examples, int(config.eval.batch_size), run.mesh,
                   progress=jax.process_index() == 0)
  results = outcome_metrics(examples, scores, run.outcomes)
  write_report(workdir, results, run, examples, scores, step=step, split=config.data.eval_split)
  if jax.process_index() == 0:
    table = "\n".join(f"  {name}: AUROC {_fmt(results[f'{name}/auroc'])}, balanced accuracy "
                      f"{_fmt(results[f'{name}/balanced_accuracy'])} ({int(results[f'{name}/num_examples'])} prompts, "
                      f"prevalence {_fmt(results[f'{name}/prevalence'])})" for name in run.outcomes)
    print(f"\nPrompt tuning evaluation on {config.data.eval_split} at step {step} "
          f"({paths.join(workdir, EVAL_DIR, 'report.md')}):\n{table}", flush=True)
  return results


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """`main.py --mode=eval`: the latest checkpoint of `workdir`, evaluated with the run's saved config (its eval
  settings, e.g. eval.batch_size and data.eval_split / max_eval_records, taken from `config`)."""
  if paths.exists(paths.join(workdir, runs.CONFIG_FILE)):
    run_config = ml_collections.ConfigDict(json.loads(paths.read_text(paths.join(workdir, runs.CONFIG_FILE))))
    with run_config.unlocked():
      run_config.eval = ml_collections.ConfigDict(config.eval.to_dict())
      run_config.data.eval_split = config.data.eval_split
      run_config.data.max_eval_records = config.data.max_eval_records
  else:
    run_config = config
  check_config(run_config, training=False)
  manager = checkpoint_manager(workdir, run_config)
  if manager.latest_step() is None:
    raise FileNotFoundError(f"no checkpoint in {paths.join(workdir, CHECKPOINT_DIR)}: train there first")
  data_dir = prepare_data(run_config, _medbind_config(run_config))
  run = build_run(run_config, embed_dim=_embed_dim(run_config))
  if "soft" in arm(run_config):
    run.embedder = LazyEmbedder(run_config.medbind_workdir, _pinned_medbind_step(run_config, workdir),
                                int(run_config.data.embed_batch_size))
  cache = run_config.get("cache_dir") or paths.join(workdir, "cache")
  examples, _ = load_split(run_config, run, data_dir, run_config.data.eval_split, cache,
                           max_records=int(run_config.data.max_eval_records), training=False)
  state, _ = build_train_step(run_config, run)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
  step = manager.latest_step()
  state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))["state"]
  return evaluate(run, make_score_fn(run), state.params, examples, workdir, step=step)
