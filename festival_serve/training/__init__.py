"""Training the embedded default models from scratch on the synthetic festival road world.

- ``hazards``: YOLIC-M2 hazard cells with a plain PyTorch loop, as in the paper (BCEWithLogits, Adam);
- ``signs``: the YOLO sign detector with ultralytics' own trainer, from a generated dataset in its format;
- ``cards``: the Markdown model card written next to each trained checkpoint.

Each trainer is a command (``python -m festival_serve.training.hazards``, ``... .signs``) that retrains
its model from a seed, shows a progress bar, and writes the weights and their model card.
"""
