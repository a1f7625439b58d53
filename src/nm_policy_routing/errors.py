"""The one exception tree: every failure says what happened, to what, and what to do."""

from __future__ import annotations

from typing import Iterable, Optional


class PolicyRoutingError(Exception):
    """Base of everything this package raises on purpose."""

    exit_code = 1


class _ProblemsError(PolicyRoutingError):
    """Every problem found with one connection, told at once."""

    what = ""

    def __init__(self, connection: str, problems: "list[str]") -> None:
        self.connection = connection
        self.problems = list(problems)
        joined = "\n  - ".join(self.problems)
        super().__init__(f"connection {connection!r}: {self.what}, nothing was installed for it:\n  - {joined}")


class PolicyError(_ProblemsError):
    """A connection's policy is invalid; carries every problem found at once."""

    exit_code = 65
    what = "invalid nm-policy-routing policy"


class ConflictError(_ProblemsError):
    """What a policy asks for is already used by someone else in the kernel."""

    exit_code = 1
    what = "conflicts with state that is not ours"


class KernelError(PolicyRoutingError):
    """The kernel refused a change; what was applied in that step was rolled back."""

    exit_code = 1


class VerifyError(KernelError):
    """After applying, the kernel did not hold what we applied."""


class NotPermittedError(PolicyRoutingError):
    """The caller lacks the privilege (CAP_NET_ADMIN, or NetworkManager's authorization)."""

    exit_code = 77


class NetworkManagerError(PolicyRoutingError):
    """NetworkManager could not be asked, or refused."""

    exit_code = 1


def raise_first(errors: Iterable[Optional[Exception]]) -> None:
    """Raise the first error of a batch's answers (None: that entry was done)."""
    for error in errors:
        if error is not None:
            raise error
