"""The two ways a checkpoint can be wrong. Each message is one line that names the culprit."""


class ConfigError(ValueError):
    """config.json (or generation_config.json) is missing, not JSON, or inconsistent."""


class CheckpointError(ValueError):
    """A weights file is truncated, malformed, or does not match the config."""
