"""leanvit.utils.retain_freed_memory: glibc keeps large freed blocks for the next tensor instead of unmapping
them (checked with glibc's own accounting, mallinfo2), and the call is a no-op returning False elsewhere."""
import ctypes
import platform

import pytest
import torch

from leanvit import utils


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def _mmapped_blocks() -> int:
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo2
    return libc.mallinfo2().hblks


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                    reason="mallopt is glibc's (elsewhere the function returns False: tested below)")
def test_large_tensors_come_from_the_heap_once_retained():
    if not hasattr(ctypes.CDLL("libc.so.6"), "mallinfo2"):
        pytest.skip("glibc older than 2.33 has no mallinfo2 to observe the allocator with")
    assert utils.retain_freed_memory() is True
    before = _mmapped_blocks()
    big = torch.empty(64 * 2**20 // 4)  # 64 MB: above glibc's largest default mmap threshold (32 MB)
    big.fill_(1.0)
    assert _mmapped_blocks() == before, "a 64 MB tensor was still served by mmap"
    del big


def test_a_no_op_off_glibc(monkeypatch):
    monkeypatch.setattr(platform, "system", lambda: "Darwin")
    assert utils.retain_freed_memory() is False
