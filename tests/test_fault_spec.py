"""KREA2_FAULTS parsing and arming (the end-to-end drills are in test_faults.py)."""

import pytest

from krea2_train.errors import UsageError
from krea2_train.train.faults import Fault, FaultInjector, parse_faults


def test_spec_parses_actions_steps_and_ranks():
    assert parse_faults("kill@5:rank=1, nan@3 ,stop@4:rank=0,term@7") == [
        Fault("kill", 5, 1),
        Fault("nan", 3, None),
        Fault("stop", 4, 0),
        Fault("term", 7, None),
    ]
    assert parse_faults("") == []


@pytest.mark.parametrize("bad", ["explode@3", "kill@x", "kill@3:node=1", "kill", "kill@2;nan@3", "kill@2:rank=x"])
def test_bad_spec_names_the_item(bad):
    with pytest.raises(UsageError, match="bad fault"):
        parse_faults(bad)


def test_faults_are_per_rank_and_only_in_the_first_start():
    spec = "nan@3,kill@5:rank=1"
    rank0, rank1 = FaultInjector(0, spec), FaultInjector(1, spec)
    assert rank0.poison_loss(3) and rank1.poison_loss(3) and not rank0.poison_loss(4)
    assert [f.action for f in rank1.faults] == ["nan", "kill"] and [f.action for f in rank0.faults] == ["nan"]
    restarted = FaultInjector(1, spec, incarnation=2)
    assert restarted.faults == [] and not restarted.poison_loss(3)
    with pytest.raises(UsageError):
        FaultInjector(0, "kill@", incarnation=2)  # a malformed spec is reported in every start
