"""Measuring generated images: a rule-based judge for the procedural shapes data set."""
