"""The evaluation report: `metrics.json` (every number), `report.md` (markdown tables) and PNG plots.

  embedding_map.png    one 2-D t-SNE of CXR, ECG and report-text embeddings, shown three ways: by modality, and the
                       CXR side and the ECG side each coloured by finding (the protocol's first multi-class task of
                       that modality; "other" = several or none of its classes).
  few_shot_curves.png  few-shot metric against shots per class, mean +- std over seeds, with chance levels.

Plots use matplotlib's object API (`Figure`), not pyplot: no global state, no display backend. Every file is written
whole through `medbind_jax.paths` (a local directory or a URI such as gs://...).
"""

from __future__ import annotations

import io
import json
from typing import Mapping

import matplotlib
import numpy as np
from matplotlib.figure import Figure

from medbind_jax import paths
from medbind_jax.evaluators import common, few_shot, tsne
from medbind_jax.evaluators import protocol as protocol_lib


METRICS_FILE, REPORT_FILE = "metrics.json", "report.md"
MAP_FILE, FEW_SHOT_FILE = "embedding_map.png", "few_shot_curves.png"
_TITLES = {"retrieval": "Retrieval", "zero_shot": "Zero-shot classification", "few_shot": "Few-shot linear probe",
           "linear_probe": "Linear probe on label fractions",
           "cross_modal": "CXR<->ECG cross-modal zero-shot classification"}
_OTHER = "other"
_REPORT = " report"  # suffix of a modality's report group in the map


def write(out_dir: str, results: Mapping[str, float], *, step: int | None, evaluators: Mapping, data:
          common.SplitEmbedder, params, protocol: protocol_lib.Protocol, plots: bool = True,
          plot_points: int = 300) -> list[str]:
  """Writes the report files into `out_dir` (created); returns their paths."""
  paths.makedirs(out_dir)
  written = [paths.join(out_dir, METRICS_FILE), paths.join(out_dir, REPORT_FILE)]
  paths.write_text_atomic(written[0], json.dumps({"step": step, **results}, indent=2, sort_keys=True))
  figures = []
  if plots:
    if sum(data.num_records.values()) >= 4:
      plot_embedding_map(paths.join(out_dir, MAP_FILE), embedding_map_points(data, params, protocol, plot_points))
      figures.append(("Joint embedding space (t-SNE)", MAP_FILE))
    for evaluator in evaluators.values():
      if isinstance(evaluator, few_shot.FewShotEvaluator) and evaluator.curves(results):
        plot_few_shot(paths.join(out_dir, FEW_SHOT_FILE), evaluator.curves(results))
        figures.append(("Few-shot curves", FEW_SHOT_FILE))
  paths.write_text_atomic(written[1], markdown(results, step=step, evaluators=evaluators, data=data,
                                               protocol=protocol, figures=figures))
  return written + [paths.join(out_dir, name) for _, name in figures]


def summary(results: Mapping[str, float], evaluators: Mapping) -> dict[str, float]:
  """The headline numbers of every evaluator (its `summary`), in evaluator order."""
  out = {}
  for evaluator in evaluators.values():
    out.update(evaluator.summary(results))
  return out


def summary_table(results: Mapping[str, float], evaluators: Mapping) -> str:
  lines = ["| metric | value |", "|---|---:|"]
  lines += [f"| {name} | {value:.4g} |" for name, value in summary(results, evaluators).items()]
  return "\n".join(lines)


def markdown(results: Mapping[str, float], *, step, evaluators: Mapping, data: common.SplitEmbedder,
             protocol: protocol_lib.Protocol, figures: list[tuple[str, str]]) -> str:
  index = data.index
  parts = [f"# MEDBind evaluation{f' at step {step}' if step is not None else ''}", "",
           f"Split `{index.split}` of `{index.data_dir}`: "
           + ", ".join(f"{data.num_records[m]} {m}" for m in data.modalities)
           + f" records. Protocol `{protocol.version}`. Evaluators: "
           + ", ".join(f"`{name}`" for name in evaluators) + ". Every number is in `metrics.json`.", "",
           "## Summary", "", summary_table(results, evaluators)]
  for name, evaluator in evaluators.items():
    parts += ["", f"## {_TITLES.get(name, name)}", "", evaluator.table(results)]
  notes = [(name, note) for name, evaluator in evaluators.items() for note in evaluator.notes]
  if notes:
    parts += ["", "## Skipped", "", *[f"- {name}: {note}" for name, note in notes]]
  if figures:
    parts += ["", "## Plots", ""] + [f"![{title}]({file})\n" for title, file in figures]
  return "\n".join(parts).rstrip() + "\n"


# ---------------------------------------------------------------------------------------------------------------------
# Several evaluation datasets
# ---------------------------------------------------------------------------------------------------------------------


def aggregate(per_dataset: Mapping[str, Mapping[str, float]], ks=(1, 5, 10)) -> dict[str, float]:
  """The paper's modality aggregate: for each modality M retrieved against text, the RSUM of its two directions
  (M->text and text->M, R@K summed over `ks`, in percent) summed over the datasets that have both.

  {'aggregate/<m>_text_rsum': total, 'aggregate/<m>_text_rsum/<dataset>': one dataset's part,
   'aggregate/<m>_text_rsum/num_datasets': how many contributed}."""
  out: dict[str, float] = {}
  for name, results in per_dataset.items():
    modalities = sorted({k.split("/")[1][:-len("_to_text")] for k in results
                         if k.startswith("retrieval/") and k.split("/")[1].endswith("_to_text")})
    for m in modalities:
      keys = [f"retrieval/{d}/R@{k}" for d in (f"{m}_to_text", f"text_to_{m}") for k in ks]
      if all(key in results for key in keys):
        part = 100.0 * sum(results[key] for key in keys)
        base = f"aggregate/{m}_text_rsum"
        out[f"{base}/{name}"] = part
        out[base] = out.get(base, 0.0) + part
        out[f"{base}/num_datasets"] = out.get(f"{base}/num_datasets", 0.0) + 1.0
  return out


def aggregate_table(results: Mapping[str, float]) -> str:
  """Markdown: each modality's aggregate RSUM and the datasets it sums."""
  totals = sorted(k for k in results if k.startswith("aggregate/") and k.count("/") == 1)
  if not totals:
    return "No evaluation dataset has modality<->text retrieval: no aggregate RSUM."
  lines = ["| modality<->text | total RSUM | datasets (RSUM each) |", "|---|---:|---|"]
  for key in totals:
    parts = {k[len(key) + 1:]: v for k, v in results.items() if k.startswith(key + "/") and
             not k.endswith("/num_datasets")}
    modality = key.split("/")[1][:-len("_text_rsum")]
    lines.append(f"| {modality} | {results[key]:.1f} | " + ", ".join(f"{n} ({v:.1f})" for n, v in parts.items()) + " |")
  return "\n".join(lines)


def write_multi(out_dir: str, results: Mapping[str, float], per_dataset: Mapping[str, Mapping[str, float]],
                suites: Mapping, *, step: int | None) -> list[str]:
  """The combined report of several evaluation datasets in `out_dir`: metrics.json (every dataset's metrics under
  its name, and the aggregates) and report.md (the aggregate, then each dataset's summary with a link to its own
  report in `<name>/report.md`)."""
  paths.makedirs(out_dir)
  written = [paths.join(out_dir, METRICS_FILE), paths.join(out_dir, REPORT_FILE)]
  paths.write_text_atomic(written[0], json.dumps({"step": step, **results}, indent=2, sort_keys=True))
  parts = [f"# MEDBind evaluation{f' at step {step}' if step is not None else ''}: {len(suites)} datasets", "",
           "Every number is in `metrics.json`, each dataset's under its name.", "",
           "## Aggregate RSUM", "",
           "Each modality's retrieval against text (M->text and text->M, R@" + "+R@".join(
               str(k) for k in next(iter(suites.values())).ks) + ", in %) summed over the datasets that have it.",
           "", aggregate_table(results)]
  for name, suite in suites.items():
    index, data = suite.data.index, suite.data
    parts += ["", f"## {name}", "",
              f"Split `{index.split}` of `{index.data_dir}`: "
              + ", ".join(f"{data.num_records[m]} {m}" for m in data.modalities)
              + f" records; protocol `{suite.protocol.version}`. "
              f"Full report: [{name}/report.md]({name}/{REPORT_FILE}).",
              "", suite.summary_table(per_dataset[name])]
  paths.write_text_atomic(written[1], "\n".join(parts).rstrip() + "\n")
  return written


# ---------------------------------------------------------------------------------------------------------------------
# Embedding map
# ---------------------------------------------------------------------------------------------------------------------


def finding_categories(labels: np.ndarray, names: list[str], classes: list[str]) -> list[str]:
  """Per row of [N, L] labels: the one class of `classes` that is positive, else "other" (several or none)."""
  columns = [names.index(c) for c in classes]
  selected, which = common.single_label(labels, columns)
  return [classes[w] if s else _OTHER for s, w in zip(selected, which)]


def embedding_map_points(data: common.SplitEmbedder, params, protocol: protocol_lib.Protocol,
                         max_points: int) -> dict[str, tuple[np.ndarray, list[str]]]:
  """{group: (embeddings [n, d], finding per point)} for groups '<m>' and '<m> report' per modality.

  At most `max_points` records per modality (a fixed random subset); each distinct report of those records is one
  text point, coloured by the finding of the first record that has it.
  """
  groups = {}
  for modality in data.modalities:
    if not data.num_records[modality]:
      continue
    emb = data.modality(params, modality)
    names = data.label_names[modality]
    tasks = [t for t in protocol.multiclass_tasks if t.modality == modality and set(t.classes) <= set(names)]
    classes = list(tasks[0].classes) if tasks else names
    rows = np.arange(len(emb.emb))
    if rows.size > max_points:
      rows = np.sort(np.random.default_rng(0).choice(rows, max_points, replace=False))
    category = finding_categories(emb.labels[rows], names, classes)
    groups[modality] = (emb.emb[rows], category)
    if modality not in data.report_modalities:
      continue
    _, keys, report_emb = data.reports(params, modality)
    report_row = {tuple(k): i for i, k in enumerate(keys.tolist())}
    first = {}
    for key, cat in zip(emb.text_key[rows].tolist(), category):
      first.setdefault(report_row[tuple(key)], cat)
    groups[modality + _REPORT] = (report_emb[list(first)], list(first.values()))
  return groups


def plot_embedding_map(path: str, groups: Mapping[str, tuple[np.ndarray, list[str]]]) -> None:
  names = list(groups)
  coords = tsne.tsne(np.concatenate([groups[g][0] for g in names]))
  bounds = np.cumsum([0] + [len(groups[g][1]) for g in names])
  xy = {g: coords[bounds[i]:bounds[i + 1]] for i, g in enumerate(names)}
  modalities = [g for g in names if not g.endswith(_REPORT)]
  fig = Figure(figsize=(6.5 * (1 + len(modalities)), 7.0), dpi=110, layout="constrained")
  axes = fig.subplots(1, 1 + len(modalities))
  style = {}  # modality k: k-th colour pair of the "tab20" palette (dark for inputs, light for their reports)
  palette = matplotlib.colormaps["tab20"].colors
  for k, m in enumerate(modalities):
    style[m] = (m.upper(), palette[(2 * k) % 20], "o^sDv"[k % 5])
    style[m + _REPORT] = (f"{m.upper()} report", palette[(2 * k + 1) % 20], "x+1234"[k % 6])
  for g in names:
    label, colour, marker = style[g]
    axes[0].scatter(*xy[g].T, s=14, color=colour, marker=marker, alpha=0.7, linewidths=0.8, label=f"{label} ({len(xy[g])})")
  axes[0].set_title("by modality (reports: line markers in the lighter shade)")
  axes[0].legend(loc="upper center", bbox_to_anchor=(0.5, -0.03), ncol=2, fontsize=9, frameon=False)
  for ax, modality in zip(axes[1:], modalities):
    for g in names:  # the other modality's points as a grey backdrop
      if g not in (modality, modality + _REPORT):
        ax.scatter(*xy[g].T, s=6, c="0.85", marker="o", linewidths=0)
    cats = sorted({c for g in (modality, modality + _REPORT) if g in groups for c in groups[g][1]},
                  key=lambda c: (c == _OTHER, c))
    palette = dict(zip([c for c in cats if c != _OTHER], _colours(len(cats))))
    palette[_OTHER] = "0.55"
    for g, marker, size in ((modality, "o", 16), (modality + _REPORT, "x", 26)):
      if g not in groups:
        continue
      colours = [palette[c] for c in groups[g][1]]
      ax.scatter(*xy[g].T, s=size, c=colours, marker=marker, alpha=0.8, linewidths=0.9)
    handles = [ax.scatter([], [], s=30, c=[palette[c]], marker="s", label=c) for c in cats]
    handles += [ax.scatter([], [], s=30, c="k", marker="o", label=f"{modality.upper()} embedding"),
                ax.scatter([], [], s=30, c="k", marker="x", label="report text")]
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.03), ncol=3, fontsize=9, frameon=False)
    ax.set_title(f"{modality.upper()} side coloured by finding")
  for ax in axes:
    ax.set_xticks([])
    ax.set_yticks([])
  fig.suptitle("t-SNE of the joint embedding space", fontsize=13)
  _save(fig, path)


def _save(fig: Figure, path: str) -> None:
  """The figure as a PNG at `path` (local or URI), written whole."""
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png")
  paths.write_bytes_atomic(path, buffer.getvalue())


def _colours(n: int) -> list:
  cmap = matplotlib.colormaps["tab10" if n <= 10 else "tab20"]
  return [cmap(i) for i in range(n)]


# ---------------------------------------------------------------------------------------------------------------------
# Few-shot curves
# ---------------------------------------------------------------------------------------------------------------------


def plot_few_shot(path: str, curves: Mapping[str, list[few_shot.Curve]]) -> None:
  fig = Figure(figsize=(6.5 * len(curves), 5.0), dpi=110, layout="constrained")
  axes = np.atleast_1d(fig.subplots(1, len(curves)))
  for ax, (modality, lines) in zip(axes, curves.items()):
    for i, (curve, colour) in enumerate(zip(lines, _colours(len(lines)))):
      mean, std = np.asarray(curve.mean), np.asarray(curve.std)
      ax.plot(curve.shots, mean, marker="o", color=colour, label=curve.label)
      ax.fill_between(curve.shots, mean - std, mean + std, color=colour, alpha=0.2, linewidth=0)
      ax.axhline(curve.chance, color=colour, linestyle=":", linewidth=1.0,
                 label="chance (dotted, per line)" if i == 0 else None)
    shots = sorted({k for curve in lines for k in curve.shots})
    ax.set_xscale("log", base=2)
    ax.set_xticks(shots, [str(k) for k in shots])
    ax.set_ylim(0.0, 1.0)
    ax.set_xlabel("shots per class")
    ax.set_ylabel("score (mean ± std over seeds)")
    ax.set_title(f"{modality.upper()}: few-shot ridge probe")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9, loc="lower right")
  _save(fig, path)
