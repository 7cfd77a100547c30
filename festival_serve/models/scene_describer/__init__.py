"""The ``scene_describer`` stage: an Idefics3 (SmolVLM) describing the scene, grounded on the findings."""
