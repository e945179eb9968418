"""The one exception of the evaluation library (evaluate.py exits with status 2 on it)."""


class EvaluateError(RuntimeError):
    """Bad input to evaluate.py; the message names the file/key and what was expected."""
