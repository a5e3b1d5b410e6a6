"""The one exception type the CLI turns into a one-line error."""


class LrinferError(ValueError):
    """Bad user input or a broken artifact. The message names the problem and the fix."""


class CheckpointError(LrinferError):
    """A compressed checkpoint is missing, corrupt, or does not match its manifest."""

