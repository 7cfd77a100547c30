"""festival-serve: the AI Festival road-safety vision pipeline on Ray Serve.

Wings by role, from the top of the import graph down (``tests/test_layers.py`` keeps it so):
``measure`` > ``ops`` > ``training`` > ``world`` > ``serving`` | ``models`` > ``pipeline`` > ``runtime``.
"""

from pathlib import Path

#: Files shipped inside the package: the sample scene, YOLIC cell layouts, the synthetic world's font.
DATA_DIR = Path(__file__).parent / "data"
