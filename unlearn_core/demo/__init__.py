"""The offline demo: the embedded models (:mod:`.models`) and the whole job on them (:mod:`.run`).

Nothing in the library proper depends on it; the tests, the benchmarks and
``python -m unlearn_core demo`` use it.
"""
