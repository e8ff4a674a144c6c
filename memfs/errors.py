"""What to tell the user when work fails inside a nursery: trio wraps a task's
exception in an exception group, and an errno is what the shell can print."""
from __future__ import annotations


def first_oserror(e: BaseException) -> OSError | None:
    """The OSError inside (possibly nested) exception groups: what to tell the user."""
    if isinstance(e, OSError):
        return e
    if isinstance(e, BaseExceptionGroup):
        for sub in e.exceptions:
            found = first_oserror(sub)
            if found is not None:
                return found
    return None
