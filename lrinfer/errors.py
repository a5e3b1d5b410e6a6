"""The one exception type the CLI turns into a one-line error."""


class LrinferError(ValueError):
    """Bad user input or a broken artifact. The message names the problem and the fix."""


class CheckpointError(LrinferError):
    """A compressed checkpoint is missing, corrupt, or does not match its manifest."""


def check_options(owner: str, given: dict, known: dict) -> None:
    """Reject keys of `given` that `known` (option -> default) lacks; `owner` names it, e.g. "solver 'saes'"."""
    if unknown := set(given) - set(known):
        raise LrinferError(f"{owner} has no option(s) {sorted(unknown)}; its options are {known or 'none'}")
