"""Errors that the user can fix.

A `RouteLensError` carries a one-line message that says what is wrong and how to fix it;
the command line prints it without a traceback and exits with code 2. Anything else that
escapes is a bug and keeps its traceback.
"""


class RouteLensError(Exception):
    """Bad input or an unsupported setting, explained in one line.

    Examples:
        >>> import routelens as rl
        >>> try:
        ...     rl.load("tiny:no_such_family")
        ... except rl.RouteLensError as error:
        ...     print(str(error).split(";")[0])
        unsupported architecture 'no_such_family'
    """


class OverrideNotApplied(RouteLensError):
    """A route override was requested but the router hook never fired or replaced fewer
    rows than asked: the result would silently be the natural route, so we refuse.

    Examples:
        >>> import routelens as rl
        >>> issubclass(rl.OverrideNotApplied, rl.RouteLensError)
        True
    """


class RouterBypassed(RouteLensError):
    """A forward ran but a router's hook never fired (a quantized or hub-kernel MLP that
    computes routing inline): its routes cannot be observed or forced."""


class RuntimeCheckFailed(RouteLensError):
    """A run-time check failed on this checkpoint: the numbers would be wrong, so none are
    given (the command line exits with code 1)."""


class FallbackTooSlow(RuntimeCheckFailed):
    """An engine's check failed and the slower engine it fell back to would run past
    `max_fallback_time`: stopped, with what was scored kept (a run folder resumes)."""


class SettingError(RouteLensError):
    """A bad value of an analysis setting. The message names each parameter in backticks as
    Python spells it (`` `routes` must be ... ``); `as_options()` is the same message with
    the command-line options (`--routes must be ...`), which the command line prints.

    Examples:
        >>> from routelens.errors import SettingError
        >>> error = SettingError("`joint_layers` must list two or more layers", "joint_layers")
        >>> str(error), error.as_options()
        ('`joint_layers` must list two or more layers', '--joint-layers must list two or more layers')
    """

    def __init__(self, message: str, *parameters: str):
        super().__init__(message)
        self.parameters = parameters

    def as_options(self) -> str:
        text = str(self)
        for name in self.parameters:
            text = text.replace(f"`{name}`", "--" + name.replace("_", "-"))
        return text
