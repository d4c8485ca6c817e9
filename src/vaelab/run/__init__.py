"""A run: its config planned in one pure step (`plan`), saved configs read as data (`trust`),
checkpoints on disk (`checkpoints`), a loaded checkpoint's state (`state`), run dirs (`dirs`)."""
