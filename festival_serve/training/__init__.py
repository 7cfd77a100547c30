"""Training the embedded default models from scratch on the synthetic festival road world.

- ``hazards``: YOLIC-M2 hazard cells with a plain PyTorch loop, as in the paper (BCEWithLogits, Adam);
- ``signs``: the YOLO sign detector with ultralytics' own trainer, from a generated dataset in its format;
- ``sign_text``: the Vietnamese sign-text recognizer (CRNN, CTC) on text lines rendered on the fly, exported as
  the PP-OCR reader's ``rec_model`` ONNX with its dictionary;
- ``cards``: the Markdown model card written next to each trained checkpoint.

Each trainer is a command (``python -m festival_serve.training.hazard_cells``, ``... .signs``) that retrains
its model from a seed, shows a progress bar, and writes the weights and their model card.
"""


def run_trainer(module, argv: list[str] | None = None) -> int:
    """``python -m festival_serve.training.<name>``: parse the trainer's arguments and run it."""
    import argparse
    import logging
    import shlex
    import sys

    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    prog = f"python -m {module.__spec__.name}"  # __name__ is "__main__" under -m
    parser = module.add_arguments(argparse.ArgumentParser(prog=prog, description=module.__doc__.split("\n\n")[0]))
    return module.cmd_train(parser.parse_args(argv), f"{prog} {shlex.join(argv)}")
