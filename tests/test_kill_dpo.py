"""The kill harness's DPO chains (test_kill.py's harness, its chains `dpo` and `dpo_cached`): full fine-tuning
against its frozen reference copy, and with the reference log-probs cached in the run. A file of their own so that
`--dist loadfile` runs them beside the full and LoRA chains: test_kill.py with all four chains was 437 s on one
worker, the last 7 minutes of `make test` (durations of 2026-12-07: dpo_cached 167 s, full 92 s, lora 92 s, dpo 86 s).
"""

from __future__ import annotations

import pytest

import test_kill
from test_kill import reference  # noqa: F401 - the module fixture: each chain's uninterrupted run

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("method", ["dpo", "dpo_cached"])
def test_dpo_interrupt_anywhere_then_resume_ends_bitwise_equal(tmp_path, reference, method):  # noqa: F811
    test_kill.test_interrupt_anywhere_then_resume_ends_bitwise_equal(tmp_path, reference, method)
