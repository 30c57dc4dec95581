"""The units of the attention benchmark (`benchmarks/attention.py`, `jaxsys bench attention`).

  configs    the configurations, the tuning trees and the engine shapes, as data; tree builders
  harness    inputs, the jitted variants (ours, split-KV, naive) and round-robin timing
  baselines  JAX's own Pallas GPU decode kernels, as tunable baselines
  sweeps     the block-size sweeps of ours and of the baselines, as data, and the tuner
  phases     the benchmark's phases: configurations, calibration, host plan timing
  report     targets (geometric means), the plot

Not a benchmark itself (the leading underscore keeps it out of `jaxsys bench`'s list).
"""
