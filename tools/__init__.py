"""Tooling of this repository (the demo, a train.py child process for tests); not part of the library."""
