"""The one exception type for mistakes a user can make: the CLI prints its message and exits 2."""


class UserError(Exception):
    """Bad input (file, field, option, model folder): one sentence naming what is wrong."""


def require(*checks: tuple[str, bool, str]) -> None:
    """Raise for the first (option, holds, requirement) whose condition does not hold."""
    for option, holds, requirement in checks:
        if not holds:
            raise UserError(f"{option} must be {requirement}")


def first_line(err: Exception) -> str:
    """An exception's first line of text (its type's name when it has none), to quote in a UserError."""
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__
