"""A run: its config planned in one pure step (`plan`), saved configs read as data (`trust`),
run dirs and checkpoints on disk (`io`)."""
