"""World wing: the synthetic festival road world — scenes, sign text, descriptions, and the scores that judge answers against it."""
