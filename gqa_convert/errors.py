"""The one error type users see: a message that says what is wrong and how to fix it."""


class GQAConvertError(ValueError):
    """Bad input or an impossible request. The CLI prints it as one line on stderr."""
