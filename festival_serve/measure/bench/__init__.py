"""``festival-serve bench``: the graph against the seed-style baseline and a LitServe peer (``run``), its reports, micro-benchmarks."""
