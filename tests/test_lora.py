"""LoRA on the Flax decoder: fresh adapters (B = 0) leave the outputs bit-identical; tuning steps change the
adapters and leave the frozen base (float32 or held in bfloat16) bit-identical; adapter dropout acts in training
only; the merged export loads in transformers with the adapted model's logits."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from medbind_jax.llm import llama, loading, lora

CONFIG = llama.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                           num_kv_heads=2, rms_norm_eps=1e-5, eos_token_ids=(2,))
TARGETS = r"(q_proj|v_proj|down_proj)$"


def _ids(seed=0, batch=4, length=10):
  return jnp.asarray(np.random.RandomState(seed).randint(0, CONFIG.vocab_size, (batch, length)))


def _base_params(seed=0):
  """Random decoder parameters, norm scales perturbed away from ones (which would hide layout mistakes)."""
  params = llama.Llama(CONFIG).init(jax.random.key(seed), _ids())["params"]
  return jax.tree_util.tree_map_with_path(
      lambda path, x: x + 0.1 * jax.random.normal(jax.random.key(len(path)), x.shape)
      if path[-1].key == "scale" else x, params)


def _adapted(dropout=0.0, seed=1, random_b=False):
  """(LoRA model, params = base + adapters); with random_b the adapters are non-zero (as after tuning)."""
  model = llama.Llama(CONFIG, lora=lora.LoraConfig(targets=TARGETS, rank=4, alpha=8.0, dropout=dropout))
  adapters = lora.init_adapters(model, jax.random.key(seed))
  if random_b:
    adapters = jax.tree_util.tree_map_with_path(
        lambda path, x: 0.2 * jax.random.normal(jax.random.key(seed), x.shape) if path[-1].key == "lora_b" else x,
        adapters)
  return model, lora.combine(adapters, _base_params())


def _logits(model, params, train=False, rng=None):
  rngs = None if rng is None else {"dropout": rng}
  return np.asarray(jax.jit(lambda p: model.apply({"params": p}, _ids(), train=train, rngs=rngs)["logits"])(params))


def test_adapters_sit_on_the_targets_and_fresh_ones_change_nothing():
  model, params = _adapted(dropout=0.1)
  adapters, base = lora.partition(params)
  modules = {"/".join(path[:-1]) for path in traverse_util.flatten_dict(adapters)}
  assert modules == {f"layers_{i}/{m}" for i in range(2) for m in ("self_attn/q_proj", "self_attn/v_proj",
                                                                    "mlp/down_proj")}
  a = adapters["layers_0"]["self_attn"]["q_proj"]["lora_a"]
  assert a.shape == (32, 4) and float(jnp.std(a)) > 0.05  # uniform(+-1/sqrt(32)): std 0.10
  assert all(not np.any(np.asarray(x["lora_b"])) for x in jax.tree.leaves(
      adapters, is_leaf=lambda x: isinstance(x, dict) and "lora_b" in x))

  plain = _logits(llama.Llama(CONFIG), base)
  np.testing.assert_array_equal(_logits(model, params), plain)
  np.testing.assert_array_equal(_logits(model, params, train=True, rng=jax.random.key(3)), plain)


@pytest.mark.parametrize("base_dtype", [jnp.float32, jnp.bfloat16])
def test_tuning_changes_the_adapters_only(base_dtype):
  model, params = _adapted(dropout=0.1)
  trainable, frozen = lora.partition(params)
  frozen = lora.cast_floating(frozen, base_dtype)
  frozen_before = jax.tree.map(np.array, frozen)
  trainable_before = jax.tree.map(np.array, trainable)
  ids = _ids(seed=5)
  tx = optax.adam(3e-2)
  opt_state = tx.init(trainable)

  def loss_fn(trainable, frozen, rng):
    logits = model.apply({"params": lora.combine(trainable, frozen)}, ids[:, :-1], train=True,
                         rngs={"dropout": rng})["logits"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()

  @jax.jit
  def step(trainable, frozen, opt_state, rng):
    loss, grads = jax.value_and_grad(loss_fn)(trainable, frozen, rng)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state, loss

  losses = []
  for i in range(8):
    trainable, opt_state, loss = step(trainable, frozen, opt_state, jax.random.key(i))
    losses.append(float(loss))
  assert losses[-1] < losses[0] - 0.05, losses
  jax.tree.map(np.testing.assert_array_equal, frozen, frozen_before)
  assert all(x.dtype == base_dtype for x in jax.tree.leaves(frozen))
  for path, before in traverse_util.flatten_dict(trainable_before).items():
    after = np.asarray(traverse_util.flatten_dict(trainable)[path])
    assert np.abs(after - before).max() > 1e-3, path


def test_adapter_dropout_acts_in_training_only():
  model, params = _adapted(dropout=0.3, random_b=True)
  evaluation = _logits(model, params)
  np.testing.assert_array_equal(_logits(model, params, rng=jax.random.key(1)), evaluation)  # rng unused in eval
  train_a = _logits(model, params, train=True, rng=jax.random.key(1))
  train_b = _logits(model, params, train=True, rng=jax.random.key(2))
  assert np.abs(train_a - evaluation).max() > 1e-3 and np.abs(train_a - train_b).max() > 1e-3
  no_dropout = model.clone(lora=lora.LoraConfig(targets=TARGETS, rank=4, alpha=8.0, dropout=0.0))
  np.testing.assert_allclose(_logits(no_dropout, params, train=True, rng=jax.random.key(1)), evaluation, atol=1e-6)


def test_merged_export_loads_in_transformers_with_the_adapted_logits(tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  model, params = _adapted(random_b=True)
  adapted = _logits(model, params)
  assert np.abs(adapted - _logits(llama.Llama(CONFIG), lora.partition(params)[1])).max() > 1e-2

  loading.save_hf(model, params, str(tmp_path))
  reference = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
  assert type(reference).__name__ == "LlamaForCausalLM"
  with torch.no_grad():
    expected = reference(torch.tensor(np.asarray(_ids()))).logits.numpy()
  np.testing.assert_allclose(expected, adapted, atol=1e-4, rtol=0)

  plain, merged, _ = loading.load_hf(str(tmp_path))  # and back into the Flax decoder, without adapters
  assert plain.lora is None and not any("lora" in "/".join(p) for p in traverse_util.flatten_dict(merged))
  np.testing.assert_allclose(_logits(plain, merged), adapted, atol=1e-5)


def test_partition_and_config_errors_say_what_to_do():
  with pytest.raises(ValueError, match="build it with lora=LoraConfig"):
    lora.init_adapters(llama.Llama(CONFIG), jax.random.key(0))
  with pytest.raises(ValueError, match="no lora_a / lora_b leaves"):
    lora.partition(_base_params())
  trainable, frozen = lora.partition(_adapted()[1])
  with pytest.raises(ValueError, match="more than one tree"):
    lora.combine(trainable, frozen, trainable)
  with pytest.raises(ValueError, match="rank must be >= 1"):
    lora.LoraConfig(rank=0)
  with pytest.raises(ValueError, match="no parameter path matches"):
    lora.init_adapters(llama.Llama(CONFIG, lora=lora.LoraConfig(targets="qkv_proj")), jax.random.key(0))
