"""Benchmarks: corpus generator, throughput, engines and the LlamaIndex peer (see README.md).

Not part of the installed package and never collected by pytest; run each module
from the repository root with `.venv/bin/python -m bench.<name>`.
"""
