"""imctl: the command-line client of the IM backend (`python -m imctl --help`)."""
