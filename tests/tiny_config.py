"""The tiny training config of the tests: tiny towers on `tiny_data` datasets, fast to compile and run.

Also a config file for main.py (the multi-process tests run it as their users would):

  python main.py --config=tests/tiny_config.py:DATA_DIR,total_steps=4 --workdir=W
"""

from configs import medbind


def tiny_config(data_dir, **overrides):
  c = medbind.get_config("batch_size=8,linked_per_batch=4,steps=6")
  c.data.dir, c.data.synthetic = data_dir, None
  c.data.cxr.image_size = 16
  c.data.ecg.update(sampling_rate=50.0, num_samples=100)
  c.data.text_max_length = 16
  c.model.embed_dim, c.model.head_hidden_dim = 16, 0
  c.model.towers.cxr.kwargs.update(image_size=16, patch_size=8, hidden_size=16, num_layers=1, num_heads=2,
                                   mlp_dim=32)
  c.model.towers.ecg.kwargs.update(num_samples=100, patch_size=25, hidden_size=16, num_layers=1, num_heads=2,
                                   mlp_dim=32)
  # A tiny random BERT with the packaged MiniLM tokenizer: the loop under test, not the pretrained weights.
  c.model.towers.text.update(init="", tokenizer="minilm", kwargs=dict(hidden_size=16, num_layers=1, num_heads=2,
                                                               intermediate_size=32, pooling="mean"))
  c.log_every, c.checkpoint_every = 1, 2
  c.eval.batch_size = 16
  for key, value in overrides.items():
    target = c
    *path, leaf = key.split(".")
    for p in path:
      target = target[p]
    target[leaf] = value
  return c


def get_config(arg: str = ""):
  """`arg`: the data directory, then optional `key=value` overrides of top-level int fields (e.g. total_steps)."""
  data_dir, *overrides = arg.split(",")
  config = tiny_config(data_dir)
  for item in overrides:
    key, value = item.split("=")
    config[key] = type(config[key])(value)
  return config
