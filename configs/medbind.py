r"""MEDBind: CXR, ECG and text in one embedding space (TMCL + EMCL).

Default: the CPU-sized run on the built-in synthetic clinical world (generated on first use, then reused).

  python main.py --config=configs/medbind.py --workdir=workdirs/medbind

Arguments after the colon override the run's main knobs, e.g. a shorter run:

  python main.py --config=configs/medbind.py:batch_size=64,steps=200 --workdir=workdirs/short

A converted data directory instead of the synthetic world (`data_dir=DIR`), with only the edges its modalities
allow (`edges=`, `+`-separated names of config.loss.edges; default all), e.g. PTB-XL (ECG and reports, no CXR):

  python main.py --config=configs/medbind.py:data_dir=/data/ptbxl,edges=ecg_text --workdir=workdirs/ptbxl

The paper-scale variant (Swin-T 224 CXR tower, clinical BERT text tower trained end to end, batch 256) on
shards converted from the real datasets by `data_prep` (the checkpoint directories hold Hugging Face
`config.json` + `model.safetensors`):

  python main.py --config=configs/medbind.py:paper,data_dir=/data/medbind,cxr_init=/ckpt/swin-tiny,\
text_init=/ckpt/Bio_ClinicalBERT --workdir=gs://bucket/medbind

With `data_root=ROOT` instead of data_dir, the paper variant trains on its mixture (PAPER_SOURCES: the linked
MIMIC set plus PTB-XL's ECG-report pairs) and evaluates on the paper's six datasets (PAPER_EVAL), each converted
into ROOT/<name> (README, "Training on your data" and "Evaluating on the paper's datasets").

Any field can also be set with `--config.path.to.field=value`.
"""

import math

import ml_collections

from configs import common


def _edges(emcl_weight: float) -> dict[str, dict]:
  """MEDBind's contrastive edges by name (fields: the Loss block of get_config); `edges=` keeps a subset."""
  return dict(
      cxr_text=dict(modalities=("cxr", "text"), kind="tmcl", weight=1.0),
      ecg_text=dict(modalities=("ecg", "text"), kind="tmcl", weight=1.0),
      cxr_ecg=dict(modalities=("cxr", "ecg"), kind="pair", weight=emcl_weight, negatives="linked"),
  )


def select_edges(edges: dict[str, dict], names: str) -> dict[str, dict]:
  """The edges `names` ("ecg_text+cxr_text"; empty: all) keeps, in their default order. An unknown name is an
  error listing the known ones, so a typo never trains a different objective silently."""
  wanted = [n.strip() for n in names.split("+") if n.strip()]
  unknown = [n for n in wanted if n not in edges]
  if unknown:
    raise ValueError(f"edges={names}: unknown edge(s) {unknown}; known: {'+'.join(edges)} (join several with '+', "
                     "e.g. edges=ecg_text+cxr_text)")
  return {name: edge for name, edge in edges.items() if not wanted or name in wanted}


# The paper's training mixture, as `data_prep` converts it into <data_root>/<name>: the linked MIMIC set (MIMIC-CXR
# images and reports with MIMIC-IV-ECG; python -m data_prep.mimic) feeds every edge, the CXR-ECG pair edge from
# its linked encounters; PTB-XL's train folds (python -m data_prep.ptbxl) add ECG-report pairs to the ECG-text
# edge. Weights are a pool's shares: PTB-XL's 0.1 against MIMIC's 1.0 gives it 1 in 11 of the ECG rows (about
# twice its share by size, 17k against ~800k ECGs), so its cleaner machine-read statements are seen each epoch
# without drowning MIMIC's. CheXpert 5x200, Open-i and CPSC2018 stay evaluation sets (their text is label-derived
# or their records are the benchmark).
PAPER_SOURCES = (
    ("mimic", 1.0),
    ("ptbxl", 0.1),
)


# The paper's evaluation datasets, as `data_prep` converts them into <eval_root>/<name> (README, "Evaluating on the
# paper's datasets"): CXR<->report retrieval on MIMIC-CXR, CheXpert 5x200 and Open-i (their aggregate RSUM is the
# paper's CXR total), ECG zero-shot / few-shot / linear probes on PTB-XL and CPSC2018, CXR<->ECG cross-modal tasks
# on linked MIMIC encounters. CheXpert 5x200 and Open-i are evaluation-only sets (one split): their few-shot
# support comes from the test split itself.
PAPER_EVAL = (
    ("mimic_cxr", "mimic_cxr_v1", "train"),
    ("chexpert5x200", "chexpert5x200_v1", ""),
    ("openi", "openi_v1", ""),
    ("ptbxl", "ptbxl_v1", "train"),
    ("cpsc2018", "cpsc2018_v1", "train"),
    ("mimic", "mimic_v1", "train"),
)


def paper_eval_datasets(root: str) -> tuple[dict, ...]:
  return tuple(dict(name=name, dir=f"{root.rstrip('/')}/{name}", split="test", protocol=protocol,
                    support_split=support) for name, protocol, support in PAPER_EVAL)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = common.parse_arg(arg, paper=False, data_dir="", edges="", batch_size=0, linked_per_batch=-1, steps=0,
                         seed=0, emcl_weight=1.0, cxr_init="", text_init="", eval_root="", data_root="")
  edges = select_edges(_edges(arg.emcl_weight), arg.edges)
  has_pair_edge = any(edge["kind"] == "pair" for edge in edges.values())
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
  # data_dir=DIR trains on DIR (shards written by a data_prep converter); without it (and without `paper`) the run
  # trains on the synthetic world, generated into data/synthetic_world.
  c.data.dir = arg.data_dir or ("" if arg.paper else "data/synthetic_world")
  c.data.train_split = "train"
  # A training mixture: several converted datasets, each {dir, split='train', weight=1.0, weights={edge: weight},
  # name}, each feeding the edges whose modalities it has (medbind_jax/data/mixture.py); empty: data.dir alone.
  # data.dir stays the default evaluation data. `paper,data_root=ROOT`: the paper's mixture (PAPER_SOURCES).
  c.data.sources = ()
  if arg.data_root:
    root = arg.data_root.rstrip("/")
    c.data.dir = arg.data_dir or f"{root}/mimic"
    c.data.sources = tuple(dict(name=name, dir=f"{root}/{name}", weight=weight) for name, weight in PAPER_SOURCES)
  c.data.eval_split = "test"
  c.data.batch_size = arg.batch_size or (256 if arg.paper else 128)
  # Rows per batch from linked records (the pair edges' rows): a quarter of the batch by default, 0 when no pair
  # edge is active (a non-zero value without one is refused by medbind_jax.config_check: it would draw rows no
  # edge scores).
  c.data.linked_per_batch = (arg.linked_per_batch if arg.linked_per_batch >= 0
                             else c.data.batch_size // 4 if has_pair_edge else 0)
  c.data.skip_corrupt = False  # True: leave out damaged records (each logged and counted) instead of failing
  # Reader threads. Each builds whole batches, mostly in Python under the GIL: on the 2-core CPU demo a second
  # thread contends instead of helping (the input pipeline alone, medians of 4 runs: 1,354 examples/s with 1 thread,
  # 1,132 with 2; compare with `python -m bench.bench_step --set data.num_threads=2`).
  c.data.num_threads = 8 if arg.paper else 1
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
  # The synthetic world (only without `paper`, `data_dir` and `data_root`) is generated into data.dir when its
  # parameters differ from what is there. Its ECGs are stored at the training rate (a reference: follows
  # data.ecg.sampling_rate), so no read has to resample them.
  c.data.synthetic = ml_collections.ConfigDict(dict(
      seed=0, workers=2, ecg_store_rate=c.data.ecg.get_ref("sampling_rate").to_int())) if not (
          arg.paper or arg.data_dir or arg.data_root) else None

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
  # Default: all three (MEDBind); `edges=` keeps some, e.g. edges=ecg_text for ECG-and-report data (towers are built
  # only for the modalities the kept edges name).
  c.loss.edges = ml_collections.ConfigDict(edges)

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
  # Run at the end of training, every `every_steps` steps (0: only at the end; the numbers also go to the metric
  # writer as eval/...), and by `main.py --mode=eval`. Output: <workdir>/eval/{metrics.json, report.md, *.png}.
  # Evaluators by name (medbind_jax.evaluators.EVALUATORS); `protocol` names the versioned prompts and tasks
  # (medbind_jax/evaluators/protocols/<name>.json, or a JSON path). The few-shot and linear probes fit on
  # `support_split` of the evaluated data ('' : few-shot support from the evaluated split itself, queries from the
  # other patients; the linear probe then cannot run); `max_support_records` > 0 caps the support records embedded
  # per modality (a fixed random subset), for training splits too large to embed at every evaluation.
  # `datasets`: evaluate on several datasets in one run, each {name, dir, split, protocol, support_split}
  # (defaults: data.eval_split, protocol, support_split), metrics namespaced '<name>/...', one report with the
  # aggregate RSUM per modality; empty: data.dir's eval split alone, metrics not namespaced.
  c.eval = ml_collections.ConfigDict(dict(
      batch_size=256, ks=(1, 5, 10),
      evaluators=("retrieval", "zero_shot", "few_shot", "linear_probe", "cross_modal"),
      every_steps=0, protocol="synthetic_v1", support_split="train", max_support_records=0,
      few_shot=dict(shots=(1, 2, 4, 8, 16), seeds=5, l2=0.1),
      linear_probe=dict(fractions=(0.01, 0.1, 1.0), seeds=5, l2=0.1),
      plots=True, plot_points=300,
      datasets=paper_eval_datasets(arg.eval_root or arg.data_root) if arg.eval_root or arg.data_root else ()))
  return c
