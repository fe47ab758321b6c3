"""LLAUNCH_DIST_TIMEOUT_S, the collective timeout `llaunch submit` gives the ranks: a value no collective could
live with is one sentence from the rank (exit 2 through launcher.train.__main__), never a traceback or a job whose
collectives time out at once or never."""

import datetime

import pytest

from launcher.errors import LaunchError
from launcher.train.distributed import collective_timeout


def test_unset_is_torchs_default_and_a_number_of_seconds_is_taken():
    assert collective_timeout({}) is None and collective_timeout({"LLAUNCH_DIST_TIMEOUT_S": " "}) is None
    assert collective_timeout({"LLAUNCH_DIST_TIMEOUT_S": "300"}) == datetime.timedelta(seconds=300)


@pytest.mark.parametrize("value", ["0", "-5", "0.5", "nan", "inf", "1e400", "5m", "1e8"])
def test_a_value_no_collective_can_live_with_is_one_sentence(value):
    with pytest.raises(LaunchError, match=r"LLAUNCH_DIST_TIMEOUT_S=.* must be a number of seconds from 1 to 1e7"):
        collective_timeout({"LLAUNCH_DIST_TIMEOUT_S": value})
