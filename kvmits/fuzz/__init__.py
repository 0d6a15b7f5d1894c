"""Fuzzing harnesses for kvmits (docs/fuzzing.md).

`kvmits.fuzz.model`: the pure-Python ITS model (kvmits.its) driven by bytes, with its
architectural and contractual invariants checked on every input; `tools/fuzz model` runs it
under atheris (coverage-guided), and the test suite replays its corpus and a seeded slice
without atheris.
"""
