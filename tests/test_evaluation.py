"""Evaluation's out-of-memory recognition: what the allocators raise, and nothing else."""

from __future__ import annotations

import pytest
import torch

from emanet.evaluation import allocator_said, is_out_of_memory


@pytest.mark.parametrize(
    "error",
    [
        torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 3221225472 bytes."),
        RuntimeError("[enforce fail at alloc_cpu.cpp:114] DefaultCPUAllocator: not enough memory: you tried to ..."),
        RuntimeError("MPS backend out of memory (MPS allocated: 17.00 GB)"),
    ],
)
def test_allocator_errors_are_out_of_memory(error):
    assert is_out_of_memory(error)


@pytest.mark.parametrize(
    "error", [RuntimeError("mat1 and mat2 shapes cannot be multiplied"), ValueError("out of memory"), MemoryError()]
)
def test_other_errors_are_not(error):
    assert not is_out_of_memory(error)


def test_the_allocators_first_line_is_kept_short():
    long = RuntimeError("CUDA out of memory. " + "x" * 300 + "\nSee documentation for Memory Management")
    assert allocator_said(long).startswith("CUDA out of memory. ") and len(allocator_said(long)) == 160
