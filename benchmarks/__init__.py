"""Benchmark suite for sb3_safe_save (issue 6): ``python -m benchmarks [--quick]``.

Compares stock SB3 ``save``/``load``, raw safetensors, ``torch.save``/``torch.load`` and this library on
the same models, measures peak load memory in fresh subprocesses, and writes ``results.json``,
``RESULTS.md`` and ``plot.png`` next to this file.
"""
