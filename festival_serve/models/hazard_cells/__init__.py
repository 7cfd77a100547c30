"""The ``hazard_cells`` stage: YOLIC-M2 hazard cells."""
