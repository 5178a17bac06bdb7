"""Benchmarks: run from the repository root as ``python benchmarks/NAME.py [--quick] [--out PATH]``.

Each script writes one JSON file (default ``benchmarks/results/NAME.json``) holding the
machine (:func:`benchmarks.common.machine_info`), the settings and every measured figure.
"""
