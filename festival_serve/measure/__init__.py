"""Measure wing: benchmarks, load, faults and the accuracy eval, all driven through the running graph."""
