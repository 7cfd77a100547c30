"""Stand-in models: the project's real architectures with random weights, built offline.

Tests use small ones; ``festival-serve bench`` uses them at their real sizes (shape-true) wherever
trained weights are missing, so a benchmark costs what production costs. None of them is trained:
their answers are meaningless, their compute and memory are real.
"""
