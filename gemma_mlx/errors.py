"""Typed errors for user mistakes. The CLI turns them into one clean paragraph and exit code 1."""


class GemmaMlxError(Exception):
    """A problem the user can fix; the message says what is wrong, where, and what to do."""


class CheckpointError(GemmaMlxError):
    """A model name, hub id or directory that cannot be used."""


class OutputExistsError(GemmaMlxError):
    """An output directory holds something different; we refuse to overwrite it without --force."""


class DataError(GemmaMlxError):
    """A dataset or prompt file is invalid."""


class ConfigError(GemmaMlxError):
    """An experiment config file or option is invalid."""


class TrainingError(GemmaMlxError):
    """Training could not start or had to stop (e.g. NaN loss)."""


class OutputLockedError(GemmaMlxError):
    """Another gemma-mlx process is writing the same output; two writers would mix their files."""


class DamagedFileError(GemmaMlxError):
    """A file the tool wrote earlier is cut short or garbled, so it is not used or published."""


class VoteNotSavedError(GemmaMlxError):
    """A vote could not be written to the votes file; the battle stays open for another try."""


class ServeError(GemmaMlxError):
    """A local web server could not start (the port is taken, the address is not this machine's)."""
