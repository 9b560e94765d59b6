"""The one exception type for mistakes a user can make: the CLI prints its message and exits 2."""


class UserError(Exception):
    """Bad input (file, field, option, model folder): one sentence naming what is wrong."""
