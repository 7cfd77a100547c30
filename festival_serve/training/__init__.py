"""Training wing: the embedded default models trained from scratch on the synthetic festival road world.

One trainer per stage, named after it (the ``festival-serve train`` subcommand in brackets):

- ``hazard_cells`` (``hazards``): YOLIC-M2 with a plain PyTorch loop, as in the paper (BCEWithLogits, Adam);
- ``sign_detector`` (``signs``): the YOLO sign detector with ultralytics' own trainer, on a generated dataset;
- ``sign_classifier`` (``sign-classes``): the crop classifier that names each detected sign (ultralytics);
- ``sign_reader`` (``sign-text``): the Vietnamese recognizer (the reader's CRNN, CTC) on lines rendered on the fly;
- ``scene_describer`` (``describer``): a small Idefics3 (SmolVLM's architecture) on the world's scenes;
- ``cards``: the Markdown model card written next to each trained checkpoint; ``schedule``: what the
  time-budgeted PyTorch trainers share; ``standins/``: real architectures with random weights, for tests
  and the bench.

Each trainer is also a command (``python -m festival_serve.training.hazard_cells``, ...) that retrains its
model from a seed, shows progress, and writes the weights and their model card. Trainers import the
models they train and the world; nothing served imports a trainer.
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
