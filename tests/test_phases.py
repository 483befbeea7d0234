"""The phase timer charges each phase its own time: nested phases are subtracted from their parent."""
import time

import pytest
import torch

from quailora_convert.convert.phases import PHASES, PhaseTimer


def test_nested_phase_is_exclusive_and_totals_add_up():
    timer = PhaseTimer(torch.device("cpu"))
    started = time.perf_counter()
    with timer.phase("forward"):
        time.sleep(0.05)
        with timer.phase("hessian"):
            time.sleep(0.1)
    total = time.perf_counter() - started
    assert timer.seconds["hessian"] == pytest.approx(0.1, abs=0.05)
    assert timer.seconds["forward"] == pytest.approx(0.05, abs=0.05)
    assert sum(timer.seconds.values()) == pytest.approx(total, abs=0.01)
    assert list(timer.seconds) == list(PHASES)


def test_resumed_timer_continues_from_saved_seconds_and_rejects_unknown_phases():
    timer = PhaseTimer(torch.device("cpu"), {"solve": 3.0})
    with timer.phase("solve"):
        pass
    assert timer.seconds["solve"] >= 3.0
    with pytest.raises(ValueError, match="unknown phase"):
        with timer.phase("thinking"):
            pass
