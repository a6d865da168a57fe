"""Independent reference implementations (oracles) that the tests and the benchmarks both check against.

Not part of the installed package: plain, slow, per-sample code written from the papers and
the public reference code, never from the library's own implementation.
"""
