"""Pinned host memory within a budget (convert.host_memory): the allocator's rounding counted, pageable memory
when pinning is refused or the budget is spent. Pinning itself needs CUDA; without it every request is refused,
which is the fallback path."""
from __future__ import annotations

import pytest
import torch

from quailora_convert.convert import host_memory


@pytest.mark.parametrize("nbytes", [1, 2, 3, 576 * 2, 4096 * 2, 512 * 576 * 4, 8192 * 28672 * 2])
def test_the_allocators_rounding_is_the_next_power_of_two(nbytes):
    size = host_memory.rounded(nbytes)
    assert size >= nbytes and size & (size - 1) == 0 and (size < 2 * nbytes or nbytes == 1)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a host that cannot pin")
def test_a_refused_pin_falls_back_to_pageable_memory_until_the_scope_ends():
    with host_memory.pinned_scope(torch.device("cpu")):
        first = host_memory.pinned((4, 576), torch.float32)
        assert first.shape == (4, 576) and first.dtype == torch.float32 and not first.is_pinned()
        assert host_memory._state["failed"] and host_memory.pinned_bytes() == 0
        source = torch.randn(3, 5)
        assert host_memory.pinned_copy(source) is source  # nothing pinned: the tensor itself, not a copy
    assert not host_memory._state["failed"]  # the next conversion tries again


def test_past_the_budget_memory_is_pageable_without_trying_to_pin(monkeypatch):
    monkeypatch.setattr(host_memory, "PINNED_FRACTION", 0.0)
    tensor = host_memory.pinned((2, 3), torch.bfloat16)
    assert tensor.shape == (2, 3) and tensor.dtype == torch.bfloat16 and not tensor.is_pinned()
    assert not host_memory._state["failed"] and host_memory.pinned_bytes() == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinning needs CUDA")
def test_pinned_bytes_are_counted_rounded_and_released_with_the_tensor():
    before = host_memory.pinned_bytes()
    tensor = host_memory.pinned((512, 576), torch.float32)
    assert tensor.is_pinned() and host_memory.pinned_bytes() - before == host_memory.rounded(512 * 576 * 4)
    del tensor
    assert host_memory.pinned_bytes() == before
