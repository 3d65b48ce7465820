"""Heap reuse for `tunepipe train` processes (tunepipe/heap_reuse.py): freed large blocks are reused instead of
coming back from the kernel as fresh pages, and the user's own malloc choices are left alone."""
import subprocess
import sys

import pytest

from tunepipe import heap_reuse

GLIBC = heap_reuse.is_glibc()

# Allocate, touch and free the same 64 MB block ten times, as a training step does with its large tensors, and
# print the minor page faults those ten rounds took.
PROBE = """
import resource, sys
import numpy as np
if sys.argv[1] == "reuse":
    from tunepipe.heap_reuse import reuse_freed_memory
    assert reuse_freed_memory()
np.ones(16 << 20, dtype=np.float32).sum()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    np.ones(16 << 20, dtype=np.float32).sum()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str, env=None) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True, env=env)
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(not GLIBC, reason="the setting is glibc's; elsewhere reuse_freed_memory() does nothing")
def test_freed_blocks_are_reused_instead_of_faulted_in_again():
    plain, reused = _faults("plain"), _faults("reuse")
    # 64 MB is faulted in anew on each of the ten rounds: 16,384 pages of 4 KB, or 32 of 2 MB where numpy's
    # allocations get transparent huge pages; at least one fault per 2 MB either way
    assert plain >= 10 * 32
    assert reused < plain / 10


@pytest.mark.skipif(not GLIBC, reason="on other C libraries nothing is applied anyway")
@pytest.mark.parametrize("env, reason", [
    ({"TUNEPIPE_HEAP_REUSE": "0"}, "TUNEPIPE_HEAP_REUSE=0"),
    ({"MALLOC_TRIM_THRESHOLD_": "0"}, "malloc settings of the user's"),
    ({"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=65536"}, "malloc settings of the user's"),
    ({"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"}, "another allocator is preloaded"),
])
def test_the_users_own_malloc_choice_wins(monkeypatch, env, reason):
    for name in ("TUNEPIPE_HEAP_REUSE", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES", "LD_PRELOAD"):
        monkeypatch.delenv(name, raising=False)
    assert heap_reuse.why_not() is None
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert heap_reuse.why_not() == reason
    assert heap_reuse.reuse_freed_memory() is False


def test_only_a_train_process_of_tunepipes_own_sets_it(monkeypatch, tmp_path):
    """main() called by a caller's program (argv given) leaves malloc alone; `python -m tunepipe train` applies it."""
    from tunepipe import cli
    calls = []
    monkeypatch.setattr(heap_reuse, "reuse_freed_memory", lambda: calls.append(1) or True)
    missing = tmp_path / "missing.yaml"
    assert cli.main(["train", str(missing)]) != 0
    assert calls == []
    monkeypatch.setattr(sys, "argv", ["tunepipe", "train", str(missing)])
    assert cli.main() != 0
    assert calls == [1]
