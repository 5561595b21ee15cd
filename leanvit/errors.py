"""Errors raised for user mistakes.

The command line turns a :class:`LeanvitError` into a one-line message and a non-zero exit status,
never a traceback. Library users can catch it (it subclasses ``ValueError``).

Library messages name a setting as the library and recipes do, in backticks (```num_classes```,
```img_size```), never as a command-line flag; the command line shows it as the command's flag
(``--num-classes``) where the command has one.
"""
import errno

#: the errors of a disk that cannot take a write: full, over quota, read-only, not writable by this user
DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)


class LeanvitError(ValueError):
    """A problem with the user's input: a bad argument, file, checkpoint or configuration."""
