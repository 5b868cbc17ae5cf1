"""Errors a user can act on. Each names the key, column, file or row at fault and says how to fix it.

The `cadenza` command prints a CadenzaError as one paragraph and exits 2; any other exception is a bug in Cadenza
(or a library) and exits 1 (see cli.main).
"""


class CadenzaError(Exception):
    """Base of every error Cadenza raises on purpose."""


class ConfigError(CadenzaError, ValueError):
    """One or more problems in a config; `problems` holds (path, message) pairs, all reported at once."""

    def __init__(self, problems: list[tuple[str, str]]):
        self.problems = problems
        lines = [f"  {path or '<root>'}: {msg}" for path, msg in problems]
        noun = "problem" if len(problems) == 1 else "problems"
        super().__init__(f"invalid config, {len(problems)} {noun}:\n" + "\n".join(lines))


class DataError(CadenzaError, ValueError):
    """The data set cannot be used as given (file, column or row named in the message)."""


class ModelFolderError(CadenzaError, FileNotFoundError):
    """A saved model folder is missing, incomplete or not Cadenza's."""


class HubError(CadenzaError):
    """The Hugging Face Hub (or HF_ENDPOINT) refused or could not serve a request: repo, revision or token named."""


class HardwareError(CadenzaError):
    """The machine cannot run what the config asks for (no GPU, no bf16, out of memory), and what to change."""
