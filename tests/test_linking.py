"""The CXR-ECG linking rule of data_prep/linking.py, edge case by edge case."""

import math
import random

from data_prep.linking import Admission, Event, assign_admissions, link_events

H = 3600.0
T0 = 6644620000.0  # some MIMIC-era time (2180)


def cxr(event_id, t, subject="s1", hadm=""):
  return Event(event_id, subject, T0 + t, hadm)


ecg = cxr


def test_exactly_at_the_window_links_and_one_second_more_does_not():
  result = link_events([cxr("c1", 0.0), cxr("c2", 100 * H)], [ecg("e1", 24 * H), ecg("e2", 100 * H + 24 * H + 1)])
  assert result.pairs == [("c1", "e1")]
  assert link_events([cxr("c", 0.0)], [ecg("e", -24 * H)]).pairs == [("c", "e")]  # before, too
  assert link_events([cxr("c", 0.0)], [ecg("e", 2 * H)], window_hours=1.0).pairs == []


def test_several_candidates_take_the_closest_then_the_smallest_id():
  result = link_events([cxr("c", 0.0)], [ecg("e5", 5 * H), ecg("e1", -1 * H), ecg("e3", 3 * H)])
  assert result.pairs == [("c", "e1")]
  assert result.counts["cxr_with_several_candidates"] == 1 and result.counts["candidate_pairs"] == 3
  tie = link_events([cxr("c", 0.0)], [ecg("eb", 2 * H), ecg("ea", -2 * H)])
  assert tie.pairs == [("c", "ea")]
  tie = link_events([cxr("cb", 0.0), cxr("ca", 0.0)], [ecg("e", H)])
  assert tie.pairs == [("ca", "e")] and tie.counts["cxr_candidates_lost"] == 1


def test_one_to_one_lets_the_closest_pair_win_and_the_loser_take_its_next_best():
  # c1-e1 is the closest pair (0.5 h), so c2 cannot have e1 (1 h away) and takes e2 (2 h away).
  result = link_events([cxr("c1", 0.0), cxr("c2", -0.5 * H)], [ecg("e1", 0.5 * H), ecg("e2", 1.5 * H)])
  assert result.pairs == [("c1", "e1"), ("c2", "e2")]
  assert result.counts["linked_pairs"] == 2 and result.counts["ecg_with_several_candidates"] == 2


def test_different_admissions_never_link_and_one_admission_links_at_any_distance():
  assert link_events([cxr("c", 0.0, hadm="A")], [ecg("e", H, hadm="B")]).pairs == []
  same = link_events([cxr("c", 0.0, hadm="A")], [ecg("e", 5 * 24 * H, hadm="A")])
  assert same.pairs == [("c", "e")] and same.counts["linked_by_admission"] == 1
  # Only one side knows its admission: the time window decides.
  assert link_events([cxr("c", 0.0, hadm="A")], [ecg("e", H)]).pairs == [("c", "e")]
  assert link_events([cxr("c", 0.0, hadm="A")], [ecg("e", 30 * H)]).pairs == []


def test_other_subjects_and_unknown_times_never_link():
  assert link_events([cxr("c", 0.0, subject="s1")], [ecg("e", 0.0, subject="s2")]).pairs == []
  assert link_events([Event("c", "s1", math.nan)], [ecg("e", 0.0)]).pairs == []


def test_the_result_does_not_depend_on_input_order():
  rng = random.Random(0)
  cxrs = [cxr(f"c{i}", rng.uniform(0, 200 * H), subject=f"s{i % 3}") for i in range(30)]
  ecgs = [ecg(f"e{i}", rng.uniform(0, 200 * H), subject=f"s{i % 3}") for i in range(40)]
  expected = link_events(cxrs, ecgs)
  assert expected.pairs
  for _ in range(3):
    rng.shuffle(cxrs)
    rng.shuffle(ecgs)
    again = link_events(cxrs, ecgs)
    assert again.pairs == expected.pairs and again.counts == expected.counts


def test_assign_admissions_by_containment_with_inclusive_bounds():
  stays = [Admission("s1", "A", T0, T0 + 10 * H), Admission("s1", "B", T0 + 10 * H, T0 + 20 * H),
           Admission("s2", "C", T0, T0 + 100 * H)]
  events = [cxr("x", 10 * H), cxr("y", 15 * H), cxr("z", 25 * H), cxr("w", 0.0, subject="s3")]
  assigned = {e.event_id: e.hadm_id for e in assign_admissions(events, stays)}
  # x sits on the boundary of A and B: the earlier admission wins.
  assert assigned == {"x": "A", "y": "B", "z": "", "w": ""}
