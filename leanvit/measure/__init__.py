"""Measurement as a library: GMACs, throughput and latency, peak memory, benchmark tables.

No argument parsing here: ``leanvit bench`` / ``flops`` / ``sweep`` (in :mod:`leanvit.tools`) are thin
layers over these functions.
"""
from leanvit.measure.benchmark import ReducedView, benchmark_models, build_configurations, reduction_label
from leanvit.measure.flops import count_macs, gmacs
from leanvit.measure.memory import forward_peak_memory_mb
from leanvit.measure.report import BENCH_COLUMNS, format_table, plot_benchmark, write_csv
from leanvit.measure.timing import Measurement, interleaved_measure, measure

__all__ = ["gmacs", "count_macs", "forward_peak_memory_mb", "Measurement", "measure", "interleaved_measure",
           "BENCH_COLUMNS", "format_table", "plot_benchmark", "write_csv", "ReducedView", "benchmark_models",
           "build_configurations", "reduction_label"]
