"""The packaged evaluation protocols (medbind_jax/evaluators/protocols/*.json) against the converters they are for.

1. Every label a protocol names (prompts, multi-class tasks, cross-modal tasks) is one its dataset's converter
   writes (`<modality>_label_names`); a protocol naming any other label would have its tasks skipped on real data
   with nothing but a log line, so this is checked statically for every packaged protocol.
2. End to end: the real-layout source trees of tests/real_layouts.py are converted with each converter that has a
   protocol, and a tiny random MedBind is evaluated on the converted test split with the project's suite
   (`train.make_eval_suite`, protocol set in config.eval). Every task of the protocol must either write finite
   metrics or, where the fixture cannot support it, log the evaluator's skip reason, and which of the two happens
   is computed here from the converted labels independently of the evaluators.

The default fixture trees are a few records each; to give every class of a protocol examples, the trees built here
hold more records: the same real fixture ECGs, images and reports re-packaged under more ids, their labels
(PTB-XL scp_codes, CPSC2018 classes, MIMIC-CXR CheXpert cells) assigned to cover every class, not read off the
signals. Each example has its own patient, except where a linked subject's other study has no known value for the
label (checked), so whether a k-shot probe can run follows from the class counts alone.
"""

import csv
import dataclasses
import json
import math
import os
import re

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import real_layouts as L
from data_prep import chexpert5x200, cli, cpsc2018, mimic, mimic_cxr, mimic_ecg, openi, ptbxl
from data_prep import synthetic_world as world
from medbind_jax.evaluators import protocol as protocol_lib

OPTIONS = cli.Options(shard_size=8, workers=1, progress=False)
ALL_TEST = (0.0, 0.0, 1.0)  # hash-split fractions that put every record in "test"
SHOTS = (1, 2, 4)  # the fixtures have 3-5 examples per class: 1 and 2 shots run, 4 shots must log its skip
SEEDS = 2

# protocol -> {modality: the label names its dataset's converter writes}
CONVERTER_LABELS = {
    "synthetic_v1": {"cxr": world.CXR_LABELS, "ecg": world.ECG_LABELS},
    "chexpert5x200_v1": chexpert5x200.SPEC.label_names,
    "mimic_cxr_v1": mimic_cxr.SPEC.label_names,
    "mimic_v1": mimic.SPEC.label_names,
    "ptbxl_v1": ptbxl.SPEC.label_names,
    "cpsc2018_v1": cpsc2018.SPEC.label_names,
    "openi_v1": openi.SPEC.label_names,
}


def unknown_labels(proto: protocol_lib.Protocol, label_names) -> list[str]:
  """Every place `proto` names a modality or label that `label_names` ({modality: names}) lacks."""
  problems = []

  def check(where, modality, label):
    if modality not in label_names:
      problems.append(f"{where}: modality {modality!r} (the converter writes {sorted(label_names)})")
    elif label not in label_names[modality]:
      problems.append(f"{where}: {modality} label {label!r} (the converter writes {list(label_names[modality])})")

  for modality, by_label in proto.prompts.items():
    for label in by_label:
      check("prompts", modality, label)
  for task in proto.multiclass_tasks:
    for label in task.classes:
      check(f"multiclass task {task.name}", task.modality, label)
  for task in proto.cross_modal_tasks:
    check(f"cross-modal task {task.name} query", task.query, task.query_label)
    check(f"cross-modal task {task.name} support", task.support, task.support_label)
  return problems


# ---------------------------------------------------------------------------------------------------------------------
# 1. Labels: static
# ---------------------------------------------------------------------------------------------------------------------


def test_every_packaged_protocol_is_mapped_to_its_converter():
  assert set(protocol_lib.packaged()) == set(CONVERTER_LABELS), \
      "map each packaged protocol to the label names of the converter it is for (CONVERTER_LABELS)"


@pytest.mark.parametrize("name", sorted(CONVERTER_LABELS))
def test_protocol_names_only_labels_its_converter_writes(name):
  proto = protocol_lib.load(name)
  assert proto.version == name
  with open(os.path.join(protocol_lib._PACKAGED, name + ".json")) as f:  # pylint: disable=protected-access
    raw = json.load(f)
  assert len(raw.get("description", "")) > 200, f"{name}: describe dataset, label source, prompt sources, tasks"
  assert unknown_labels(proto, CONVERTER_LABELS[name]) == []
  for modality, by_label in proto.prompts.items():
    # Complete: every label of the converter's modality has a prompt ensemble.
    assert set(by_label) == set(CONVERTER_LABELS[name][modality]), (name, modality)
    for label, prompts in by_label.items():
      for side in (prompts.positive, prompts.negative):
        assert len(set(side)) == len(side) and all(t.strip() for t in side), (name, label)
      assert not set(prompts.positive) & set(prompts.negative), (name, label)


def test_the_check_catches_a_label_the_converter_does_not_write(tmp_path):
  with open(os.path.join(protocol_lib._PACKAGED, "ptbxl_v1.json")) as f:  # pylint: disable=protected-access
    raw = json.load(f)
  raw["prompts"]["ecg"]["HYPO"] = raw["prompts"]["ecg"].pop("HYP")  # a typo in a prompt key
  raw["multiclass_tasks"][0]["classes"][1] = "AMI"  # a subclass instead of the superclass
  raw["cross_modal_tasks"] = [{"name": "x", "query": "ecg", "query_label": "MI", "support": "cxr",
                               "support_label": "Cardiomegaly"}]
  (tmp_path / "typo.json").write_text(json.dumps(raw))
  problems = unknown_labels(protocol_lib.load(str(tmp_path / "typo.json")), ptbxl.SPEC.label_names)
  assert len(problems) == 3, problems
  assert "prompts: ecg label 'HYPO'" in problems[0]
  assert "multiclass task ptbxl_superclass: ecg label 'AMI'" in problems[1]
  assert "support: modality 'cxr'" in problems[2]


def test_linked_mimic_shares_the_mimic_cxr_prompts_and_has_no_ecg_tasks_while_mimic_ecg_writes_no_labels():
  linked, cxr_only = protocol_lib.load("mimic_v1"), protocol_lib.load("mimic_cxr_v1")
  assert linked.prompts == cxr_only.prompts
  # The paper's cross-modal tasks (CXR cardiomegaly <-> ECG LVH) need an ECG label; MIMIC-IV-ECG has none. When
  # data_prep/mimic_ecg.py starts writing ECG labels, add ECG prompts and those tasks in a new protocol version.
  assert mimic_ecg.SPEC.label_names == {"ecg": ()} and mimic.SPEC.label_names["ecg"] == ()
  assert "ecg" not in linked.prompts and not linked.cross_modal_tasks and not linked.multiclass_tasks


# ---------------------------------------------------------------------------------------------------------------------
# 2. End to end on converted real-layout trees
# ---------------------------------------------------------------------------------------------------------------------

# The IU reports with a FINDINGS or IMPRESSION section (uid 16 has neither), used as MIMIC-CXR report files.
IU_UIDS = tuple(str(u) for u in range(1, 31) if u != 16)
CXR_FINDINGS = tuple(n for n in mimic_cxr.CHEXPERT_LABELS if n != "No Finding")


def labelled_cxr_studies() -> list[L.MimicCxrStudy]:
  """10 MIMIC-CXR studies of 10 subjects whose CheXpert cells cover every label: 3 normal studies (No Finding
  1.0, the 13 findings 0.0) and 7 abnormal ones, each finding 1.0 in 3 of them, one other finding uncertain
  (-1.0) and the rest blank (unknown). As in the real table, No Finding is only ever 1.0 or blank."""
  studies = []
  for k in range(10):
    if k < 3:
      cells = {"No Finding": "1.0", **{n: "0.0" for n in CXR_FINDINGS}}
    else:
      positive = {n for j, n in enumerate(CXR_FINDINGS) if (k - 3) in {(j + t) % 7 for t in range(3)}}
      uncertain = next(n for n in CXR_FINDINGS if n not in positive)
      cells = {**{n: "1.0" for n in positive}, uncertain: "-1.0"}
    image = L.CXR_IMAGES[k % len(L.CXR_IMAGES)]
    studies.append(L.MimicCxrStudy(f"1100{k:04d}", f"5900{k:04d}", ((f"{k:08x}-aaaaaaaa-bbbbbbbb", "PA", image),),
                                   "21500101", f"{100000 + k}", "test", IU_UIDS[k], cells))
  return studies


def build_cxr_tree(root) -> None:
  """MIMIC-CXR-JPG tree: the labelled studies plus the default fixture studies, all in the official test split."""
  defaults = [dataclasses.replace(s, split="test") for s in L.DEFAULT_CXR_STUDIES]
  L.build_mimic_cxr(root, studies=labelled_cxr_studies() + defaults)


# Extra PTB-XL rows: (scp_codes, fixture ECG). 3 single-superclass records per class plus a NORM+CD and an MI+HYP
# record; the codes are real SCP statements of scp_statements.csv.
PTBXL_EXTRA = (
    ("{'NORM': 100.0, 'SR': 0.0}", "HR06000"), ("{'NORM': 80.0, 'SBRAD': 0.0}", "HR06002"),
    ("{'IMI': 100.0, 'SR': 0.0}", "HR06001"), ("{'ASMI': 100.0}", "HR06000"), ("{'AMI': 80.0, 'SR': 0.0}", "HR06002"),
    ("{'NDT': 100.0}", "HR06001"), ("{'NST_': 100.0, 'SR': 0.0}", "HR06000"), ("{'ISCAL': 50.0}", "HR06002"),
    ("{'CLBBB': 100.0}", "HR06001"), ("{'CRBBB': 100.0, 'SR': 0.0}", "HR06000"), ("{'LAFB': 100.0}", "HR06002"),
    ("{'LVH': 100.0, 'SR': 0.0}", "HR06001"), ("{'RVH': 100.0}", "HR06000"), ("{'LAO/LAE': 100.0}", "HR06002"),
    ("{'NORM': 100.0, 'IRBBB': 100.0}", "HR06001"), ("{'IMI': 100.0, 'LVH': 50.0}", "HR06000"),
)


def build_ptbxl_tree(root) -> None:
  """The real PTB-XL fixture tree (ecg_id 6000-6002; 6000 is in test fold 10) plus PTBXL_EXTRA as ecg_id 7000+,
  test fold 10, each its own patient, reports taken from the real rows."""
  real = L.build_ptbxl(root)
  with open(os.path.join(root, "ptbxl_database.csv"), newline="", encoding="utf-8") as f:
    reader = csv.DictReader(f)
    columns, rows = reader.fieldnames, list(reader)
  for i, (scp_codes, source) in enumerate(PTBXL_EXTRA):
    ecg_id = 7000 + i
    row = dict(real[6000 + i % 3], ecg_id=str(ecg_id), patient_id=f"{90000 + i}.0", scp_codes=scp_codes,
               strat_fold="10", filename_lr=f"records100/07000/{ecg_id:05d}_lr",
               filename_hr=f"records500/07000/{ecg_id:05d}_hr")
    rows.append(row)
    L.write_wfdb(os.path.join(root, "records500", "07000"), f"{ecg_id:05d}_hr", source, lead_names=L.PTBXL_LEADS)
  with open(os.path.join(root, "ptbxl_database.csv"), "w", newline="", encoding="utf-8") as f:
    writer = csv.DictWriter(f, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)


# CPSC2018: 3 recordings per class (1-9) and two with two classes, fixture CinC records renamed.
CPSC_SOURCES = ("E07500", "E07502", "E07506", "E07509", "JS20003")
CPSC_EXTRA = {f"A{n + 1:04d}": (CPSC_SOURCES[n % len(CPSC_SOURCES)], classes) for n, classes in enumerate(
    [(c,) for c in range(1, 10) for _ in range(3)] + [(2, 5), (6, 7)])}


def convert_dataset(name, tmp_path_factory) -> str:
  src, out = tmp_path_factory.mktemp(f"{name}_src"), tmp_path_factory.mktemp(f"{name}_out")
  if name == "chexpert5x200":
    summary = chexpert5x200.convert(L.build_chexpert(src), str(out), OPTIONS, per_class=3)
  elif name == "mimic_cxr":
    build_cxr_tree(src)
    summary = mimic_cxr.convert(str(src), str(out), OPTIONS)
  elif name == "mimic":
    build_cxr_tree(src / "cxr")
    L.build_mimic_ecg(src / "ecg")
    summary = mimic.convert(str(src / "cxr"), str(src / "ecg"), str(out), OPTIONS, fractions=ALL_TEST)
  elif name == "ptbxl":
    build_ptbxl_tree(src)
    summary = ptbxl.convert(str(src), str(out), OPTIONS)
  elif name == "cpsc2018":
    L.build_cpsc2018(src, records=CPSC_EXTRA)
    summary = cpsc2018.convert(str(src), str(out), OPTIONS, fractions=ALL_TEST)
  elif name == "openi":
    L.build_openi_csv(src)
    summary = openi.convert(str(src), str(out), OPTIONS)
  else:
    raise ValueError(name)
  assert summary.exit_code == 0 and not summary.errors, summary.errors
  return str(out)


@pytest.fixture(scope="module")
def tiny_model():
  """One tiny random MedBind (tests/tiny_config.py) shared by every dataset: (model, params, text_params, mesh).
  Its preprocessing (16 px images, 2 s of ECG at 50 Hz) resamples the converted 512 px / 500 Hz data."""
  from medbind_jax import runs, sharding  # pylint: disable=import-outside-toplevel
  from medbind_jax.model import build_model  # pylint: disable=import-outside-toplevel
  from tiny_config import tiny_config  # pylint: disable=import-outside-toplevel
  config = tiny_config("unused")
  model, pretrained = build_model(config)
  params = runs.initial_params(config, model, pretrained)
  text_params = params["towers"].pop("text") if runs.text_mode(config) == "cached" else None
  mesh = sharding.make_mesh(config.get("mesh", {}))
  return model, jax.device_put(params, NamedSharding(mesh, P())), text_params, mesh


def evaluate(tiny_model, data_dir, protocol_name, report_dir):
  """`train.make_eval_suite` + `Suite.run` on the converted test split under `protocol_name`."""
  from medbind_jax import runs, train  # pylint: disable=import-outside-toplevel
  from tiny_config import tiny_config  # pylint: disable=import-outside-toplevel
  model, params, text_params, mesh = tiny_model
  # Every record is in "test": few-shot support comes from the test split itself (other patients as queries).
  config = tiny_config(data_dir, **{"eval.protocol": protocol_name, "eval.few_shot.shots": SHOTS,
                                    "eval.few_shot.seeds": SEEDS, "eval.plots": False, "eval.support_split": ""})
  suite = train.make_eval_suite(config, model, runs.text_mode(config), text_params, runs.make_tokenize(config), mesh)
  return suite, suite.run(params, report_dir=report_dir, step=0)


def split_labels(records, modality, names):
  """[N, L] labels and [N] patients of the converted test records with `modality` (`records`: read back with
  `real_layouts.read_converted`, independently of the evaluators)."""
  records = [e for e in records.values() if e.split == "test" and e.has(modality)]
  labels = np.array([e.part(modality).labels for e in records], np.float32).reshape(len(records), len(names))
  return labels, [e.patient_id for e in records]


def few_shot_expectation(results, notes, stem, counts, patients):
  """Few-shot `stem` at each k: with each example its own patient (`patients`: those of the task's examples), k
  shots run iff every class keeps a query (count >= k + 1); otherwise the evaluator must say why."""
  assert len(set(patients)) == len(patients), f"{stem}: fixture precondition, one example per patient"
  ran = []
  for k in SHOTS:
    key = f"few_shot/{stem}/{k}-shot/auroc_mean"
    if min(counts) >= k + 1:
      assert math.isfinite(results[key]) and math.isfinite(results[f"few_shot/{stem}/{k}-shot/balanced_accuracy_mean"])
      ran.append(k)
    else:
      assert key not in results
      assert f"{stem} at {k} shots" in notes or f"{stem}: {list(counts)} examples per class" in notes, (stem, k)
  return ran


# dataset -> (protocol, zero-shot labels expected to have no known negatives in the fixture, as in the real data)
DATASETS = {
    "chexpert5x200": ("chexpert5x200_v1", ()),
    "mimic_cxr": ("mimic_cxr_v1", ("No Finding",)),
    "mimic": ("mimic_v1", ("No Finding",)),
    "ptbxl": ("ptbxl_v1", ()),
    "cpsc2018": ("cpsc2018_v1", ()),
    "openi": ("openi_v1", ()),
}


@pytest.mark.parametrize("dataset", sorted(DATASETS))
def test_protocol_runs_every_task_on_the_converted_dataset(dataset, tiny_model, tmp_path_factory):
  name, never_negative = DATASETS[dataset]
  data_dir = convert_dataset(dataset, tmp_path_factory)
  report_dir = str(tmp_path_factory.mktemp(f"{dataset}_eval"))
  suite, results = evaluate(tiny_model, data_dir, name, report_dir)
  proto = suite.protocol
  assert proto.version == name
  notes = {n: "\n".join(e.notes) for n, e in suite.evaluators.items()}
  assert all(math.isfinite(v) for v in results.values()), {k: v for k, v in results.items() if not math.isfinite(v)}
  with open(os.path.join(report_dir, "metrics.json")) as f:
    assert json.load(f) == {"step": 0, **results}
  assert any(k.startswith("retrieval/") for k in results)

  with open(os.path.join(data_dir, "dataset_info.json")) as f:
    info = json.load(f)
  records = L.read_converted(data_dir)
  for modality, by_label in proto.prompts.items():
    names = info[f"{modality}_label_names"]
    assert set(by_label) <= set(names)
    labels, patients = split_labels(records, modality, names)
    zero_shot_ran, few_shot_complete = [], []
    for label in by_label:
      column = labels[:, names.index(label)]
      known = (column == 0) | (column == 1)
      num_pos, num_neg = int((column == 1).sum()), int((column == 0).sum())
      base = f"zero_shot/{modality}/{label}"
      if num_pos and num_neg:
        assert math.isfinite(results[f"{base}/auroc"]) and math.isfinite(results[f"{base}/balanced_accuracy"])
        assert results[f"{base}/num_positive"] == num_pos and results[f"{base}/num_examples"] == num_pos + num_neg
        zero_shot_ran.append(label)
      else:
        assert f"{base}/auroc" not in results
        assert f"{modality}/{label}: {num_pos} positive and {num_neg} negative examples (AUROC needs both)" in \
            notes["zero_shot"]
      ran = few_shot_expectation(results, notes["few_shot"], f"{modality}/{label}", [num_neg, num_pos],
                                 [p for p, k in zip(patients, known) if k])
      if ran == list(SHOTS):
        few_shot_complete.append(label)
    # Every label runs except those the data never negates (No Finding in MIMIC-CXR's CheXpert table).
    assert sorted(zero_shot_ran) == sorted(set(by_label) - set(never_negative)), dataset
    assert results[f"zero_shot/{modality}/num_labels"] == len(zero_shot_ran)
    assert math.isfinite(results[f"zero_shot/{modality}/macro_auroc"])
    if few_shot_complete:
      assert results[f"few_shot/{modality}/macro/num_labels"] == len(few_shot_complete)
    else:
      assert f"few_shot/{modality}/macro/num_labels" not in results and f"{modality} macro: leaves out" in \
          notes["few_shot"]

  for task in proto.multiclass_tasks:
    names = info[f"{task.modality}_label_names"]
    labels, patients = split_labels(records, task.modality, names)
    sub = labels[:, [names.index(c) for c in task.classes]]
    single = np.all((sub == 0) | (sub == 1), axis=1) & ((sub == 1).sum(axis=1) == 1)
    y = np.argmax(sub == 1, axis=1)
    counts = np.bincount(y[single], minlength=len(task.classes))
    assert (counts >= 2).all(), f"{dataset}: the fixture gives every class of {task.name} examples"
    base = f"zero_shot/{task.name}"
    assert results[f"{base}/num_examples"] == single.sum() and results[f"{base}/num_classes"] == len(task.classes)
    assert math.isfinite(results[f"{base}/balanced_accuracy"]) and math.isfinite(results[f"{base}/macro_auroc"])
    assert results[f"{base}/chance_balanced_accuracy"] == pytest.approx(1 / len(task.classes))
    assert few_shot_expectation(results, notes["few_shot"], task.name, counts.tolist(),
                                [p for p, s in zip(patients, single) if s]) == [1, 2]
    assert results[f"few_shot/{task.name}/num_classes"] == len(task.classes)

  for task in proto.cross_modal_tasks:  # none of the real protocols has one yet (see the mimic_v1 test above)
    assert math.isfinite(results[f"cross_modal/{task.name}/balanced_accuracy"])
  if not proto.cross_modal_tasks:
    assert not any(k.startswith("cross_modal/") for k in results)


# ---------------------------------------------------------------------------------------------------------------------
# 3. Several evaluation datasets in one run
# ---------------------------------------------------------------------------------------------------------------------


def test_multi_dataset_evaluation_writes_one_report_with_namespaced_metrics_and_the_aggregate_rsum(
    tiny_model, tmp_path_factory):
  """The synthetic world (train + test) and the converted Open-i and PTB-XL fixtures in one evaluation
  (`config.eval.datasets`): each dataset's metrics under its name, equal to what it writes into its own report
  directory; the aggregate CXR and ECG RSUMs are the sums of the datasets' M<->text RSUMs."""
  from medbind_jax import runs, train  # pylint: disable=import-outside-toplevel
  from tiny_config import tiny_config  # pylint: disable=import-outside-toplevel
  world_dir = tmp_path_factory.mktemp("world")
  world.ensure_world(world_dir, world.WorldParams(num_patients=40, image_size=32, ecg_sampling_rate=100,
                                                  ecg_seconds=2.0, num_shards=(1, 1, 1)), workers=1, progress=False)
  datasets = (dict(name="synthetic", dir=str(world_dir)),  # split, protocol, support_split: the config's
              dict(name="openi", dir=convert_dataset("openi", tmp_path_factory), protocol="openi_v1",
                   support_split=""),
              dict(name="ptbxl", dir=convert_dataset("ptbxl", tmp_path_factory), protocol="ptbxl_v1",
                   support_split=""))
  model, params, text_params, mesh = tiny_model
  config = tiny_config(str(world_dir), **{"eval.datasets": datasets, "eval.few_shot.shots": (1, 2),
                                          "eval.few_shot.seeds": 2, "eval.linear_probe.seeds": 2,
                                          "eval.plots": False})
  suite = train.make_eval_suite(config, model, runs.text_mode(config), text_params, runs.make_tokenize(config), mesh)
  report_dir = tmp_path_factory.mktemp("multi_eval")
  results = suite.run(params, report_dir=str(report_dir), step=7)

  assert all(math.isfinite(v) for v in results.values())
  assert not [k for k in results if k.split("/")[0] not in ("synthetic", "openi", "ptbxl", "aggregate")]
  per_dataset = {}
  for name in ("synthetic", "openi", "ptbxl"):
    with open(report_dir / name / "metrics.json") as f:
      own = json.load(f)
    assert own.pop("step") == 7
    assert own == {k[len(name) + 1:]: v for k, v in results.items() if k.startswith(name + "/")}
    assert (report_dir / name / "report.md").exists()
    per_dataset[name] = own
  # What each dataset evaluated: its own modalities and protocol; the synthetic world's probes fit on its train split.
  assert "retrieval/cxr_to_text/R@1" in per_dataset["openi"] and "retrieval/ecg_to_text/R@1" in per_dataset["ptbxl"]
  assert not any("/ecg" in k for k in per_dataset["openi"]) and not any("/cxr" in k for k in per_dataset["ptbxl"])
  assert math.isfinite(per_dataset["ptbxl"]["zero_shot/ecg/macro_auroc"])
  assert "linear_probe/cxr/macro/100pct/auroc_mean" in per_dataset["synthetic"]
  assert "support drawn from split `train`" in (report_dir / "synthetic" / "report.md").read_text()

  def text_rsum(own, m):
    return 100 * sum(own[f"retrieval/{d}/R@{k}"] for d in (f"{m}_to_text", f"text_to_{m}") for k in (1, 5, 10))

  for m, names in (("cxr", ("synthetic", "openi")), ("ecg", ("synthetic", "ptbxl"))):
    parts = {n: text_rsum(per_dataset[n], m) for n in names}
    assert results[f"aggregate/{m}_text_rsum"] == pytest.approx(sum(parts.values()))
    assert results[f"aggregate/{m}_text_rsum/num_datasets"] == 2
    for n, part in parts.items():
      assert results[f"aggregate/{m}_text_rsum/{n}"] == pytest.approx(part)
  with open(report_dir / "metrics.json") as f:
    assert json.load(f) == {"step": 7, **results}
  text = (report_dir / "report.md").read_text()
  assert "## Aggregate RSUM" in text and f"| cxr | {results['aggregate/cxr_text_rsum']:.1f} |" in text
  for name in ("synthetic", "openi", "ptbxl"):
    assert f"## {name}" in text and f"({name}/report.md)" in text


def test_evaluation_dataset_entries_are_checked_with_messages_that_name_the_fix(tiny_model, tmp_path_factory):
  from medbind_jax import config_check, runs, train  # pylint: disable=import-outside-toplevel
  from tiny_config import tiny_config  # pylint: disable=import-outside-toplevel
  for entry, words in ((dict(dir="/d"), "needs a 'name'"), (dict(name="a b", dir="/d"), "letters, digits"),
                       (dict(name="a"), "and a 'dir'"),
                       (dict(name="a", dir="/d", protcol="x"), "unknown keys ['protcol']")):
    with pytest.raises(ValueError, match=re.escape(words)):
      config_check.eval_datasets(tiny_config("unused", **{"eval.datasets": (entry,)}))
  with pytest.raises(ValueError, match=r"names must be unique, got \['a', 'a'\]"):
    config_check.eval_datasets(tiny_config("unused", **{"eval.datasets": (dict(name="a", dir="/d"),
                                                                   dict(name="a", dir="/e"))}))
  # Defaults come from the config; an empty list is the training data's eval split alone.
  config = tiny_config("/train", **{"eval.datasets": (dict(name="a", dir="/d"),), "eval.protocol": "ptbxl_v1"})
  assert config_check.eval_datasets(config) == [dict(name="a", dir="/d", split="test", protocol="ptbxl_v1",
                                              support_split="train")]
  assert config_check.eval_datasets(tiny_config("/train")) == [dict(name="", dir="/train", split="test",
                                                             protocol="synthetic_v1", support_split="train")]
  # A support split the data does not have (CheXpert 5x200 is test only).
  model, _, text_params, mesh = tiny_model
  config = tiny_config(convert_dataset("chexpert5x200", tmp_path_factory), **{"eval.protocol": "chexpert5x200_v1"})
  with pytest.raises(ValueError, match=r"has no split 'train' records of the modalities it evaluates \(\['cxr'\]\)"
                                       r".*support_split='train'.*or '' to draw few-shot"):
    train.make_eval_suite(config, model, runs.text_mode(config), text_params, runs.make_tokenize(config), mesh)


def test_the_paper_config_evaluates_the_six_real_datasets_each_under_its_converters_protocol():
  from configs import medbind  # pylint: disable=import-outside-toplevel
  assert medbind.get_config("paper").eval.datasets == ()  # without eval_root: the training data's test split
  datasets = medbind.get_config("paper,eval_root=/data/eval/").eval.datasets
  assert [d["name"] for d in datasets] == ["mimic_cxr", "chexpert5x200", "openi", "ptbxl", "cpsc2018", "mimic"]
  for d in datasets:
    assert d["dir"] == f"/data/eval/{d['name']}" and d["split"] == "test"
    assert d["protocol"] == f"{d['name']}_v1" and d["protocol"] in CONVERTER_LABELS
    # Evaluation-only sets (every record in one split) draw few-shot support from it; the others from train.
    assert d["support_split"] == ("" if d["name"] in ("chexpert5x200", "openi") else "train")
  # data_root: the paper's training mixture and the same six evaluation datasets under one root.
  config = medbind.get_config("paper,data_root=/data/medbind")
  assert config.data.dir == "/data/medbind/mimic" and config.data.synthetic is None
  assert [(s["name"], s["dir"], s["weight"]) for s in config.data.sources] == [
      ("mimic", "/data/medbind/mimic", 1.0), ("ptbxl", "/data/medbind/ptbxl", 0.1)]
  assert [d["dir"] for d in config.eval.datasets] == [d["dir"].replace("/data/eval", "/data/medbind") for d in datasets]
