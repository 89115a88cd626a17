"""Named error types.

Every error a user can cause derives from :class:`EdgeLLMError`; its message is
one line that names the problem and the fix. CLIs and the workflow print that
line and exit non-zero; anything else is a bug and keeps its traceback.
"""


class EdgeLLMError(Exception):
    """A problem with the user's input, reported as one line."""


class ConfigError(EdgeLLMError):
    """The workflow configuration is invalid."""


class SourceError(EdgeLLMError):
    """A model source (checkpoint directory or hub id) cannot be used."""


class UnsupportedArchitectureError(EdgeLLMError):
    """The checkpoint's architecture has no family spec."""


class PrecisionError(EdgeLLMError):
    """A precision string is malformed or not allowed where it is used."""


class ChatTemplateError(EdgeLLMError):
    """A chat template cannot be turned into the runtime's processed form."""


class MissingDependencyError(EdgeLLMError):
    """An optional dependency (TensorRT, a GPU) needed by a step is absent."""


class ParityError(EdgeLLMError):
    """An export's outputs differ from the reference model's beyond the tolerances."""


class SignatureError(SourceError):
    """A source does not match its declared signature, or the signature does not verify."""
