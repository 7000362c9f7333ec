"""Prompts for multimodal prompt tuning: templates -> chat-formatted token ids with soft-token slots.

One prompt per (encounter, outcome). The user message is built from sections, each a template from the config,
joined by newlines in this order and left out when the arm does not use it:

  learned   "<prompt>"                                   n learned soft tokens (prompt tuning), when n > 0
  facts     "Patient: {age}-year-old {sex}; ..."         the patient facts (arm part `facts`)
  reports   "Chest X-ray report: {report}" per modality  the written reports (arm part `reports`)
  soft      "Chest X-ray: <cxr>" per modality            MEDBind soft tokens (arm part `soft`)
  question  "Will this patient ...? Answer Yes or No."   one per outcome

and wrapped in the tokenizer's chat template (optional system message, then the generation prompt, so the next
token is the answer). A placeholder `<cxr>` / `<ecg>` / `<prompt>` becomes k token positions that the model fills
with soft tokens instead of token embeddings: the text between placeholders is tokenized segment by segment, and
each placeholder contributes k positions holding a filler id plus a slot number (`slots`: -1 for a real token,
else the row of the example's soft-token table [S, width], laid out modality by modality, k rows each, then the n
learned rows). Nothing is added to the tokenizer's vocabulary, so any base and tokenizer work unchanged.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping, Sequence

import numpy as np

ARM_PARTS = ("facts", "reports", "soft")
LEARNED_PLACEHOLDER = "<prompt>"


def placeholder(modality: str) -> str:
  """The soft-token placeholder of a modality in a template: `<cxr>`, `<ecg>`."""
  return f"<{modality}>"


def parse_arm(inputs: str) -> tuple[str, ...]:
  """'facts+reports+soft' -> ('facts', 'reports', 'soft') (in ARM_PARTS order); raises ValueError naming the known
  parts for an unknown or empty one."""
  parts = [p.strip() for p in inputs.split("+")]
  unknown = [p for p in parts if p not in ARM_PARTS]
  if unknown or not parts:
    raise ValueError(f"prompt inputs {inputs!r}: unknown part(s) {unknown}; join some of {'+'.join(ARM_PARTS)} with "
                     "'+', e.g. facts+soft")
  return tuple(p for p in ARM_PARTS if p in parts)


@dataclasses.dataclass(frozen=True)
class Templates:
  """The section templates (see the module docstring). `facts` takes {age} (years), {sex} (`sex_words`) and
  {comorbidities}; `reports[m]` takes {report}; `soft[m]` must hold `placeholder(m)` once; `questions[o]` is the
  question of outcome o; `system` replaces the chat template's default system message ('' keeps it)."""

  facts: str
  reports: Mapping[str, str]
  soft: Mapping[str, str]
  questions: Mapping[str, str]
  system: str = ""
  sex_words: tuple[str, str] = ("woman", "man")  # sex_male = 0, 1

  @classmethod
  def from_config(cls, prompt_config) -> Templates:
    """From config.prompt (a ConfigDict or a dict)."""
    c = prompt_config

    def as_dict(x):
      return x.to_dict() if hasattr(x, "to_dict") else dict(x)

    return cls(facts=c["facts"], reports=as_dict(c["reports"]), soft=as_dict(c["soft"]),
               questions=as_dict(c["questions"]), system=c.get("system", ""),
               sex_words=tuple(c.get("sex_words", ("woman", "man"))))

  def check(self, arm: Sequence[str], modalities: Sequence[str], outcomes: Sequence[str]) -> None:
    """Raises ValueError naming the template to fix: a missing template, a soft template without its placeholder
    (or with another modality's), a placeholder outside the soft templates."""
    missing = [f"prompt.questions.{o}" for o in outcomes if o not in self.questions]
    if "reports" in arm:
      missing += [f"prompt.reports.{m}" for m in modalities if m not in self.reports]
    if "soft" in arm:
      missing += [f"prompt.soft.{m}" for m in modalities if m not in self.soft]
    if missing:
      raise ValueError(f"no template for {', '.join(missing)}: add one to the config")
    known = [placeholder(m) for m in modalities] + [LEARNED_PLACEHOLDER]
    if "soft" in arm:
      for m in modalities:
        found = _placeholders(self.soft[m], known)
        if found != [placeholder(m)]:
          raise ValueError(f"prompt.soft.{m} = {self.soft[m]!r} must hold {placeholder(m)} exactly once and no other "
                           f"placeholder (found {found})")
    others = {"prompt.facts": self.facts, "prompt.system": self.system,
              **{f"prompt.reports.{m}": t for m, t in self.reports.items()},
              **{f"prompt.questions.{o}": t for o, t in self.questions.items()}}
    for name, text in others.items():
      if _placeholders(text, known):
        raise ValueError(f"{name} = {text!r} holds a soft-token placeholder; only prompt.soft templates may")


def _placeholders(text: str, known: Sequence[str]) -> list[str]:
  return re.findall("|".join(re.escape(p) for p in known), text)


@dataclasses.dataclass(frozen=True)
class PromptInputs:
  """What one encounter's prompts are built from."""

  facts: Mapping[str, float]  # age (years), sex_male (0/1), comorbidity_count
  reports: Mapping[str, str]  # modality -> report text


def user_message(example: PromptInputs, outcome: str, templates: Templates, arm: Sequence[str],
                 modalities: Sequence[str], num_learned: int = 0) -> str:
  """The user message of (encounter, outcome) for an arm (parts of ARM_PARTS), placeholders included."""
  sections = [LEARNED_PLACEHOLDER] if num_learned else []
  if "facts" in arm:
    facts = example.facts
    sections.append(templates.facts.format(age=int(round(float(facts["age"]))),
                                           sex=templates.sex_words[int(facts["sex_male"])],
                                           comorbidities=int(facts["comorbidity_count"])))
  if "reports" in arm:
    sections += [templates.reports[m].format(report=example.reports[m].strip()) for m in modalities]
  if "soft" in arm:
    sections += [templates.soft[m] for m in modalities]
  sections.append(templates.questions[outcome])
  return "\n".join(sections)


@dataclasses.dataclass(frozen=True)
class SoftLayout:
  """Where each placeholder's soft tokens sit in an example's soft-token table: `modalities` with `tokens` rows
  each, then `num_learned` learned rows."""

  modalities: tuple[str, ...]
  tokens: int
  num_learned: int = 0

  @property
  def size(self) -> int:
    return len(self.modalities) * self.tokens + self.num_learned

  def rows(self) -> dict[str, range]:
    """placeholder -> its rows of the table."""
    out = {placeholder(m): range(i * self.tokens, (i + 1) * self.tokens) for i, m in enumerate(self.modalities)}
    if self.num_learned:
      start = len(self.modalities) * self.tokens
      out[LEARNED_PLACEHOLDER] = range(start, start + self.num_learned)
    return out


def chat_text(tokenizer, user: str, system: str = "") -> str:
  """`user` (and `system`, when given) in the tokenizer's chat template, ending with the generation prompt."""
  messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
  return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def encode(tokenizer, text: str, layout: SoftLayout, filler_id: int) -> tuple[np.ndarray, np.ndarray]:
  """(token ids [T] int32, slots [T] int32) of a chat-formatted text: each placeholder of `layout` becomes its rows'
  positions (id `filler_id`, slot = table row), the text between placeholders is tokenized without added special
  tokens (the chat template already wrote them). Raises ValueError when a placeholder of the layout is missing or
  repeated."""
  rows = layout.rows()
  pieces = re.split("(" + "|".join(re.escape(p) for p in rows) + ")", text) if rows else [text]
  found = [p for p in pieces if p in rows]
  if sorted(found) != sorted(rows):
    raise ValueError(f"the prompt must hold each of {sorted(rows)} once, found {found}: {text!r}")
  ids: list[int] = []
  slots: list[int] = []
  for piece in pieces:
    if piece in rows:
      ids += [filler_id] * len(rows[piece])
      slots += list(rows[piece])
    elif piece:
      piece_ids = tokenizer(piece, add_special_tokens=False)["input_ids"]
      ids += piece_ids
      slots += [-1] * len(piece_ids)
  return np.asarray(ids, np.int32), np.asarray(slots, np.int32)


@dataclasses.dataclass
class TokenTable:
  """Right-padded prompts: ids / slots [N, T] (padding: id `pad_id`, slot -1), lengths [N]."""

  ids: np.ndarray
  slots: np.ndarray
  lengths: np.ndarray

  @property
  def mask(self) -> np.ndarray:
    return (np.arange(self.ids.shape[1])[None, :] < self.lengths[:, None]).astype(np.int32)


def pad_table(encoded: Sequence[tuple[np.ndarray, np.ndarray]], pad_id: int, *, multiple: int = 16,
              max_length: int = 0) -> TokenTable:
  """Stacks encoded prompts right-padded to the longest rounded up to `multiple` (one compiled shape per table),
  or to `max_length` when > 0 (a longer prompt raises ValueError naming its length)."""
  lengths = np.asarray([len(ids) for ids, _ in encoded], np.int32)
  longest = int(lengths.max()) if len(lengths) else 1
  if max_length and longest > max_length:
    raise ValueError(f"a prompt has {longest} tokens, more than prompt.max_length={max_length}: raise it (or 0: "
                     "the longest prompt's length)")
  width = max_length or -(-longest // multiple) * multiple
  ids = np.full((len(encoded), width), pad_id, np.int32)
  slots = np.full((len(encoded), width), -1, np.int32)
  for i, (row_ids, row_slots) in enumerate(encoded):
    ids[i, :len(row_ids)], slots[i, :len(row_slots)] = row_ids, row_slots
  return TokenTable(ids=ids, slots=slots, lengths=lengths)


def label_token_ids(tokenizer, words: Sequence[str]) -> tuple[int, ...]:
  """The single token id of each answer word (as the first token after the generation prompt). Raises ValueError
  naming a word that is not one token, with the pieces it splits into."""
  out = []
  for word in words:
    ids = tokenizer(word, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
      raise ValueError(f"answer word {word!r} is {len(ids)} tokens ({tokenizer.convert_ids_to_tokens(ids)}) for this "
                       "tokenizer; prompt.label_words must be single tokens (e.g. 'Yes'/'No' or ' yes'/' no')")
    out.append(int(ids[0]))
  if len(set(out)) != len(out):
    raise ValueError(f"prompt.label_words {tuple(words)} map to the same token")
  return tuple(out)


def filler_and_pad_ids(tokenizer) -> tuple[int, int]:
  """(id written at soft-token positions, id of padding): the tokenizer's pad id, else its eos id, else 0. Neither
  is ever looked up as a token where it matters (soft positions are replaced, padding is masked)."""
  for candidate in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None)):
    if candidate is not None:
      return int(candidate), int(candidate)
  return 0, 0


def describe(table: TokenTable, tokenizer, row: int = 0) -> str:
  """A readable rendering of one prompt (soft positions as [slot n]) for logs and reports."""
  out: list[Any] = []
  for token, slot in zip(table.ids[row, :table.lengths[row]], table.slots[row, :table.lengths[row]]):
    out.append(f"[slot {slot}]" if slot >= 0 else tokenizer.decode([int(token)]))
  return "".join(out)
