"""The one error type users see (a message that says what is wrong and how to fix it), and the
errno values that mean the disk refused more bytes."""

import errno


class GQAConvertError(ValueError):
    """Bad input or an impossible request. The CLI prints it as one line on stderr."""


# A full disk, a file over the size limit, or an exhausted quota: the user must free space.
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EFBIG, errno.EDQUOT})


def is_disk_full(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS


def one_line(text: object) -> str:
    """A message on one line: errors of other libraries often span several."""
    return " ".join(str(text).split())
