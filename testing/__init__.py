"""Shared by the tests and the benchmarks (never imported by the library): tiny model shapes, shard and
cluster fixtures, and reference implementations the new code is compared against."""
