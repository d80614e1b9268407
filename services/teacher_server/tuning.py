"""Process tuning: large messages, and torch's thread count in worker threads.

A batch of 1024 questions and its answers is ~4 MB on the wire, copied several
times between gRPC, protobuf and torch. glibc serves each such buffer with a fresh
``mmap`` and returns it on free, so every call pays page faults and zeroing for
every copy: we measured a bare 1024-row echo at 7.8 ms per call on loopback,
and 2.9 ms once large blocks stay in the heap (docs/benchmarks.md).
``tune_allocator`` asks glibc for that, via ``mallopt``, in our entry points
(``teacher-server``, ``ddistill``, the benchmarks). Elsewhere it does nothing.

``torch_thread_pool``: torch applies ``torch.set_num_threads`` to the threads it
knows; a thread it has not seen (a gRPC handler, an ``asyncio.to_thread`` worker)
runs its CPU kernels on every core until it asks, and a matmul split over another
number of threads rounds differently in the last bit. A teacher must answer a
request the same way whichever thread serves it: a trainer that rides out a
teacher restart then ends exactly as an uninterrupted run, and through Adagrad a
last-bit difference grows into a different student.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
from concurrent.futures import ThreadPoolExecutor

import torch

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
MiB = 1 << 20


def tune_allocator() -> bool:
    """Keep blocks up to 32 MiB in the heap and do not trim it eagerly; True if applied."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to tune
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    applied = all((
        mallopt(M_MMAP_THRESHOLD, 32 * MiB),  # glibc's maximum on 64-bit
        mallopt(M_TRIM_THRESHOLD, 512 * MiB),
        mallopt(M_TOP_PAD, 64 * MiB),
    ))
    if not applied:
        log.debug("mallopt refused the large-message settings")
    return applied


def torch_thread_pool(max_workers: int, thread_name_prefix: str) -> ThreadPoolExecutor:
    """A thread pool whose threads use the creating thread's ``torch.get_num_threads()``."""
    return ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix=thread_name_prefix,
                              initializer=torch.set_num_threads, initargs=(torch.get_num_threads(),))
