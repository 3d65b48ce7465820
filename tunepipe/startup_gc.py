"""Garbage collection while a command starts: torch and transformers allocate millions of objects on import, and
Python's cyclic collector would walk them again and again (and once more at exit)."""
from __future__ import annotations

import contextlib
import gc

# Python's cyclic GC while torch/transformers import and a model loads: with the default young generation of 700
# allocations it runs about a thousand times (several full passes over a growing heap of module objects); a young
# generation of 50,000 collects rarely. What it saves is measured by benchmarks/startup.py (results/startup.json).
FEWER_GC_PASSES = (50_000, 20, 100)


@contextlib.contextmanager
def predict_gc(command: str, program: bool):
    """`tunepipe predict`: fewer cyclic-GC passes for the whole command (restored right after loading, the next
    allocation would pay the postponed full collection); then, when main is the process, every object is
    frozen before the process exits: the interpreter's shutdown would otherwise walk all of torch/transformers with
    the cyclic GC (benchmarks/startup.py measures the cost) and they are left to the OS. Safe for
    predict: its --output file is closed before this, stdout/stderr are flushed by the interpreter and atexit
    handlers still run; a caller of main() keeps its own garbage collection."""
    if command != "predict":
        yield
        return
    with fewer_gc_passes():
        try:
            yield
        finally:
            if program:
                gc.freeze()


@contextlib.contextmanager
def fewer_gc_passes():
    """Fewer cyclic-GC passes (FEWER_GC_PASSES) while modules import and the model loads; young garbage is still
    collected, every 50,000 allocations. The thresholds in force before come back afterwards."""
    before = gc.get_threshold()
    gc.set_threshold(*FEWER_GC_PASSES)
    try:
        yield
    finally:
        gc.set_threshold(*before)
