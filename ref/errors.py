"""The two ways a checkpoint can be wrong, and a bad command line. Each message is one line that names the
culprit."""

import argparse


class ConfigError(ValueError):
    """config.json (or generation_config.json) is missing, not JSON, or inconsistent."""


class CheckpointError(ValueError):
    """A weights file is truncated, malformed, or does not match the config."""


class UsageError(Exception):
    """A bad command line: exit status 2."""


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad command line raises UsageError (the caller prints one line, exits 2) instead
    of printing the usage and exiting: ref.run, ref.verify, ref.golden and fast.bench parse with it."""

    def error(self, message):
        raise UsageError(message)


def positive_int(s: str) -> int:
    """An argparse type: the text of a whole number of at least 1 -> that int (else the parser's error)."""
    v = int(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {v}")
    return v
