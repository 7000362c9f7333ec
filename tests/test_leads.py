"""medbind_jax.data.leads: the one table of lead-name spellings, used by the converters, the pipeline and the
inference API."""

import numpy as np
import pytest

from data_prep import ecg_io
from data_prep.errors import RecordError
from medbind_jax.data import leads, preprocess, schema

# name -> (canonical lead, sign): every form the table accepts.
ACCEPTED = {
    # The 12 names in any case, surrounding whitespace ignored.
    "I": ("I", 1), "II": ("II", 1), "III": ("III", 1), "aVR": ("aVR", 1), "aVL": ("aVL", 1), "aVF": ("aVF", 1),
    "V1": ("V1", 1), "V2": ("V2", 1), "V3": ("V3", 1), "V4": ("V4", 1), "V5": ("V5", 1), "V6": ("V6", 1),
    "i": ("I", 1), "ii": ("II", 1), "iIi": ("III", 1), "AVR": ("aVR", 1), "avl": ("aVL", 1), "AvF": ("aVF", 1),
    "v1": ("V1", 1), " V6 ": ("V6", 1), "\taVL\n": ("aVL", 1),
    # One separator between V and the digit.
    "V-3": ("V3", 1), "v_4": ("V4", 1), "V 5": ("V5", 1),
    # The 'lead' prefix, any case, with one optional separator.
    "Lead I": ("I", 1), "lead_aVR": ("aVR", 1), "LEAD-V1": ("V1", 1), "leadII": ("II", 1), "Lead_AVR": ("aVR", 1),
    "lead v-2": ("V2", 1),
    # One leading '-': the inverted lead.
    "-aVR": ("aVR", -1), "-avr": ("aVR", -1), "-I": ("I", -1), "-V6": ("V6", -1), " -aVR": ("aVR", -1),
    "-Lead aVR": ("aVR", -1), "-lead_III": ("III", -1), "-V-3": ("V3", -1),
}

REFUSED = [
    "", "   ", "-", "lead", "Lead ", "V", "aV", "av",
    # Other leads: not among the 12.
    "V7", "V8", "V9", "V0", "V06", "V3R", "V4R", "MLII", "ML II", "II2", "IIII", "IV", "aVX", "vx", "vy", "vz",
    "X", "Y", "Z", "AVRL",
    # A sign other than one leading '-'.
    "+aVR", "--aVR", "- aVR", "+-aVR", "aVR-", "(-aVR)",
    # A sign after the prefix: the minus would sit inside the name ('lead' + separator + '-aVR').
    "Lead -aVR", "Lead--aVR", "lead_-aVR",
    # Separators anywhere else, or more than one.
    "aV R", "a-VR", "a VR", "I I", "I_I", "aVR_", "_aVR", "lead  I", "lead__I", "V--3", "V  3", "l ead I",
    "Lead.I", "V.3",
    # Letters outside ASCII that case-fold onto a lead's (the Turkish dotted and dotless i).
    "\u0130", "\u0131\u0131", "\u0130II", "\u0131",
]


@pytest.mark.parametrize("name", sorted(ACCEPTED))
def test_every_accepted_spelling_parses_to_its_lead_and_sign(name):
  assert leads.parse_lead(name) == ACCEPTED[name]


@pytest.mark.parametrize("name", REFUSED)
def test_every_refused_spelling_is_unrecognised(name):
  assert leads.parse_lead(name) == (None, 1)


def test_leads_12_is_the_schema_order_and_every_canonical_name_parses_to_itself():
  assert leads.LEADS_12 is schema.LEADS_12
  assert [leads.parse_lead(lead) for lead in leads.LEADS_12] == [(lead, 1) for lead in schema.LEADS_12]
  assert [leads.parse_lead("-" + lead) for lead in leads.LEADS_12] == [(lead, -1) for lead in schema.LEADS_12]


def test_match_leads_orders_by_name_with_signs_and_ignores_other_leads():
  names = ["vx", "V6", "-AVR", "Lead I", "aVL", "ii", "III", "aVF", "V1", "v2", "V-3", "V4", "V5", "MLII", "V7"]
  columns, signs = leads.match_leads(names)
  assert [names[c] for c in columns] == ["Lead I", "ii", "III", "-AVR", "aVL", "aVF", "V1", "v2", "V-3", "V4",
                                         "V5", "V6"]
  assert signs == [1, 1, 1, -1] + [1] * 8
  # A subset of the 12, in the order asked for.
  assert leads.match_leads(names, ("V1", "aVR")) == ([8, 2], [1, -1])


def test_a_missing_lead_is_named_with_the_unrecognised_names():
  names = list(schema.LEADS_12[:11]) + ["V7", "vx"]
  with pytest.raises(leads.LeadError) as err:
    leads.match_leads(names)
  assert err.value.kind == "missing leads" and err.value.missing == ["V6"]
  assert err.value.unrecognised == ["V7", "vx"] and not err.value.duplicates
  message = str(err.value)
  assert message.startswith(f"missing leads: ['V6']; the record has {names}; unrecognised lead names ['V7', 'vx']")
  assert "expected the leads I, II, III, aVR, aVL, aVF, V1, V2, V3, V4, V5, V6" in message
  assert isinstance(err.value, ValueError)


@pytest.mark.parametrize("extra", ["aVR", "-aVR", "AVR", "lead aVR", "-Lead_avr"])
def test_a_lead_given_twice_signed_or_not_is_a_duplicate(extra):
  names = list(schema.LEADS_12) + [extra]
  with pytest.raises(leads.LeadError, match=rf"duplicate lead: aVR appears twice \(as \['aVR', '{extra}'\]\)") as err:
    leads.match_leads(names)
  assert err.value.kind == "duplicate lead" and err.value.duplicates == {"aVR": ["aVR", extra]}


def test_duplicates_missing_and_unrecognised_in_one_message():
  names = ["I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "v5", "-V5", "V7"]
  with pytest.raises(leads.LeadError) as err:
    leads.match_leads(names)
  assert err.value.kind == "duplicate lead"
  assert str(err.value).startswith(
      "duplicate lead: V5 appears 3 times (as ['V5', 'v5', '-V5']); missing leads ['V6']; the record has ")
  assert "unrecognised lead names ['V7']" in str(err.value)


def test_every_path_uses_the_one_rule():
  # The converters (RecordError of the same kind and message), the pipeline and the inference API (InputError
  # naming the input) accept, sign and refuse the same names.
  names = ["-aVR", "Lead I", "ii", "III", "aVL", "aVF", "V1", "v2", "V-3", "V4", "V5", "V6"]
  signal = np.arange(24.0).reshape(2, 12) + 1.0
  want = signal[:, [1, 2, 3, 0, 4, 5, 6, 7, 8, 9, 10, 11]] * np.array([1, 1, 1, -1] + [1] * 8)
  assert ecg_io.match_leads(names) == leads.match_leads(names)
  np.testing.assert_array_equal(preprocess.canonical_leads(signal, names, preprocess.EcgSpec()), want)
  bad = names[:11] + ["V7"]
  with pytest.raises(leads.LeadError) as lead_err:
    leads.match_leads(bad)
  with pytest.raises(RecordError) as record_err:
    ecg_io.match_leads(bad)
  assert (record_err.value.kind, str(record_err.value)) == (lead_err.value.kind, str(lead_err.value))
  with pytest.raises(preprocess.InputError) as input_err:
    preprocess.canonical_leads(signal, bad, preprocess.EcgSpec(), name="rec")
  assert str(input_err.value) == f"rec: {lead_err.value}"


def test_non_finite_names_count_and_leads():
  signal = np.zeros((10, 12))
  assert leads.non_finite(signal, schema.LEADS_12) == ""
  signal[2:5, 7] = np.nan
  signal[0, 0] = -np.inf
  assert leads.non_finite(signal, schema.LEADS_12) == "4 in leads ['I', 'V2']"
