"""Benchmarks of the sam_fused op layer (docs/DESIGN.md section 8), installed as sam_fused.bench.

`python -m sam_fused.bench` prints one table (op x backend x profile) against a copy-bandwidth roofline and two
baselines; `pytest bench/` runs the pytest-benchmark version of the step timing. profiles.py holds the parameter
shapes, baselines.py the per-parameter loop and foreach implementations of a SAM step.
"""
