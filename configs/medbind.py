r"""MEDBind: CXR, ECG and text in one embedding space (TMCL + EMCL).

Default: the CPU-sized run on the built-in synthetic clinical world (generated on first use, then reused).

  python main.py --config=configs/medbind.py --workdir=workdirs/medbind

Arguments after the colon override the run's main knobs, e.g. a shorter run:

  python main.py --config=configs/medbind.py:batch_size=64,steps=200 --workdir=workdirs/short

The paper-scale variant (Swin-T 224 CXR tower, clinical BERT text tower trained end to end, batch 256) on
shards converted from the real datasets by `data_prep` (the checkpoint directories hold Hugging Face
`config.json` + `model.safetensors`):

  python main.py --config=configs/medbind.py:paper,data_dir=/data/medbind,cxr_init=/ckpt/swin-tiny,\
text_init=/ckpt/Bio_ClinicalBERT --workdir=gs://bucket/medbind

Any field can also be set with `--config.path.to.field=value`.
"""

import math

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = common.parse_arg(arg, paper=False, data_dir="", batch_size=0, linked_per_batch=-1, steps=0, seed=0,
                         emcl_weight=1.0, cxr_init="", text_init="")
  c = ml_collections.ConfigDict()
  c.seed = arg.seed
  c.total_steps = arg.steps or (20_000 if arg.paper else 1000)
  c.log_every = 50 if arg.paper else 10
  c.checkpoint_every = 1000 if arg.paper else 100
  c.keep_checkpoints = 3
  # Write checkpoints in the background (orbax async): training goes on while the arrays are written. A run killed
  # during a write resumes from the last complete checkpoint either way (orbax commits a step by renaming it).
  c.checkpoint_async = arg.paper
  # Preemption-safe resume order: the workdir's own checkpoint, else `resume` (a checkpoint directory of
  # another run), else pretrained tower weights (model.*.init), else random init.
  c.resume = ""
  # Derived data several runs can share (frozen text-trunk features); empty: inside the workdir.
  c.cache_dir = ""

  # ---- Input --------------------------------------------------------------------------------------------------
  c.data = ml_collections.ConfigDict()
  c.data.dir = arg.data_dir or ("" if arg.paper else "data/synthetic_world")
  c.data.train_split = "train"
  c.data.eval_split = "test"
  c.data.batch_size = arg.batch_size or (256 if arg.paper else 128)
  c.data.linked_per_batch = arg.linked_per_batch if arg.linked_per_batch >= 0 else c.data.batch_size // 4
  c.data.skip_corrupt = False  # True: leave out damaged records (each logged and counted) instead of failing
  c.data.num_threads = 8 if arg.paper else 2
  c.data.prefetch = 8 if arg.paper else 4
  c.data.augment = True
  # Input sizes are shared by reference with the towers, so `--config.data.cxr.image_size=...` resizes both.
  image_size = ml_collections.FieldReference(224 if arg.paper else 64)
  ecg_samples = ml_collections.FieldReference(5000 if arg.paper else 1000)
  c.data.cxr = ml_collections.ConfigDict(dict(image_size=image_size,
                                              channels=1, mean=0.5, std=0.25, crop_scale=(0.9, 1.0), jitter=0.1))
  c.data.ecg = ml_collections.ConfigDict(dict(sampling_rate=500.0 if arg.paper else 100.0,
                                              num_samples=ecg_samples, scale_mv=1.0,
                                              amplitude_jitter=0.1, noise_mv=0.02))
  c.data.text_max_length = 128  # whole reports: 39% of the synthetic CXR reports run past 64 tokens
  # The synthetic world is generated into data.dir when its parameters differ from what is there. Its ECGs are
  # stored at the training rate (a reference: follows data.ecg.sampling_rate), so no read has to resample them.
  c.data.synthetic = ml_collections.ConfigDict(dict(
      seed=0, workers=2, ecg_store_rate=c.data.ecg.get_ref("sampling_rate").to_int())) if not arg.paper else None

  # ---- Model --------------------------------------------------------------------------------------------------
  c.model = ml_collections.ConfigDict()
  c.model.embed_dim = 256
  c.model.head_hidden_dim = 0 if arg.paper else 512
  c.model.per_edge_logit_scale = True  # one temperature per edge (False: one shared by edges naming none)
  c.model.logit_scale_init = math.log(1 / 0.07)
  c.model.max_logit_scale = 100.0
  c.model.logit_bias_init = -10.0  # the learnable bias of sigmoid edges (SigLIP's initialisation)
  # Every tower and head: compute dtype ("bfloat16" for mixed precision; parameters stay float32) and
  # rematerialisation of transformer blocks (activation memory for compute). A tower's kwargs override these.
  c.model.dtype = "float32"
  c.model.remat = False
  # Towers by modality: encoder name (medbind_jax.models.ENCODERS), `init` (a local Hugging Face directory,
  # or "minilm" for the packaged all-MiniLM-L6-v2 weights), checkpoint keys to skip, and module fields.
  if arg.paper:
    cxr_tower = dict(name="swin", init=arg.cxr_init, skip_keys=(), kwargs=dict())
  else:
    cxr_tower = dict(name="vit", init="", skip_keys=(), kwargs=dict(
        image_size=image_size, patch_size=8, num_channels=1, hidden_size=96, num_layers=3, num_heads=3, mlp_dim=288,
        pooling="mean", stem_channels=(24, 48, 96)))
  ecg_tower = dict(name="ecg_transformer", init="", skip_keys=(), kwargs=dict(
      num_samples=ecg_samples, num_leads=12,
      patch_size=50,
      hidden_size=512 if arg.paper else 96, num_layers=8 if arg.paper else 3, num_heads=8 if arg.paper else 3,
      mlp_dim=2048 if arg.paper else 288, pooling="mean"))
  # Text (the reports of every modality): a BERT-family checkpoint directory, or "minilm".
  # trunk = "cached": frozen, its pooled output computed once per unique report (CPU demo);
  # trunk = "train": the whole tower runs in every step (paper scale; freeze parts with optim.param_groups).
  text_tower = dict(
      name="bert", init=arg.text_init or ("" if arg.paper else "minilm"), skip_keys=(r"^pooler\.",),
      tokenizer="",  # a local tokenizer directory; empty: the one in `init`
      trunk="train" if arg.paper else "cached", kwargs=dict(pooling="mean" if not arg.paper else "cls"))
  c.model.towers = ml_collections.ConfigDict(dict(cxr=cxr_tower, ecg=ecg_tower, text=text_tower))

  # ---- Loss ---------------------------------------------------------------------------------------------------
  # The contrastive edges by name: two modalities, kind ("tmcl": a modality against its reports, duplicate
  # reports as extra positives; "sigmoid": the same pairs with SigLIP's pairwise sigmoid loss and a learnable
  # bias; "pair": two modalities of linked records), weight, and optionally `logit_scale`
  # (a temperature name edges can share; default the edge's own) and, for pair edges, `negatives` ("linked":
  # only linked rows are columns; "all": every row of the batch), and `chunk` (0: whole logits; > 0: logits formed
  # that many columns at a time, for batches whose [rows, B] logits do not fit; same loss and gradients). The
  # weight of cxr_ecg is MEDBind's lambda (0: the paper's "unbound" ablation).
  c.loss = ml_collections.ConfigDict()
  # The contrastive matmuls run at full float32 precision ("highest"; scales up to 100 amplify bf16/TF32
  # rounding on accelerators); "default" leaves it to the platform.
  c.loss.precision = "highest"
  c.loss.edges = ml_collections.ConfigDict(dict(
      cxr_text=dict(modalities=("cxr", "text"), kind="tmcl", weight=1.0),
      ecg_text=dict(modalities=("ecg", "text"), kind="tmcl", weight=1.0),
      cxr_ecg=dict(modalities=("cxr", "ecg"), kind="pair", weight=arg.emcl_weight, negatives="linked"),
  ))

  # ---- Devices ------------------------------------------------------------------------------------------------
  # Mesh data x fsdp over every device (data=-1: what fsdp leaves). Batch rows are split over both axes;
  # parameters and optimiser state over fsdp: the largest dimension fsdp divides of every parameter with at least
  # fsdp_min_size elements, unless param_rules ((regex over parameter paths, one mesh axis or None per dimension),
  # first match wins) say otherwise. fsdp=1: data parallel, parameters replicated.
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, fsdp_min_size=1 << 14, param_rules=()))

  # ---- Optimiser ----------------------------------------------------------------------------------------------
  # microbatches = k > 1: the gradient of the whole contrastive batch, computed k micro-batches at a time
  # (embeddings first, then each micro-batch's towers again; medbind_jax/steps.py): exact, for batches whose
  # activations do not fit at once, at about 4/3 the step time.
  c.optim = ml_collections.ConfigDict(dict(
      learning_rate=1e-4 if arg.paper else 2e-3, warmup_steps=1000 if arg.paper else 50, b1=0.9, b2=0.98,
      eps=1e-6, weight_decay=0.05, grad_clip_norm=1.0, microbatches=1,
      # (regex over '/'-joined parameter paths, learning-rate multiplier or None = frozen); first match wins.
      param_groups=((r"^towers/text/embeddings/", 0.1),) if arg.paper else ()))

  # ---- Evaluation ---------------------------------------------------------------------------------------------
  # Run on data.eval_split at the end of training, every `every_steps` steps (0: only at the end; the numbers also go
  # to the metric writer as eval/...), and by `main.py --mode=eval`. Output: <workdir>/eval/{metrics.json, report.md,
  # *.png}. Evaluators by name (medbind_jax.evaluators.EVALUATORS); `protocol` names the versioned prompts and
  # tasks (medbind_jax/evaluators/protocols/<name>.json, or a JSON path).
  c.eval = ml_collections.ConfigDict(dict(
      batch_size=256, ks=(1, 5, 10), evaluators=("retrieval", "zero_shot", "few_shot", "cross_modal"),
      every_steps=0, protocol="synthetic_v1", few_shot=dict(shots=(1, 2, 4, 8, 16), seeds=5, l2=0.1),
      plots=True, plot_points=300))
  return c
