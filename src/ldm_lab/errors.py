"""The one user-error type, at the bottom of the stack.

A ``UserError`` is bad input a user can fix (a recipe key, a path, a flag value): its message is
one sentence saying what is wrong and what to do. The CLI prints it and exits with code 2, with no
traceback and nothing already written removed. ``TrainingDiverged`` (exit 3) is the one training
failure the CLI reports the same way.
"""


class UserError(Exception):
    """Bad input from the user: printed as one sentence, exit code 2."""


class TrainingDiverged(RuntimeError):
    """The loss stayed NaN/inf for ``train.max_nonfinite_steps`` steps; a checkpoint was saved."""
