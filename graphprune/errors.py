"""Errors that name the problem, so a user knows what to change."""


class GraphpruneError(Exception):
    """Base class for every error graphprune raises on purpose."""


class InputError(GraphpruneError, ValueError):
    """The caller passed something graphprune cannot use (inputs, ratios, names, options)."""


class CaptureError(GraphpruneError):
    """The model could not be turned into a graph.

    ``site`` is the user's failing line, ``(file, line number, source text)``, where known, and
    ``reason`` torch's own one-line message, so that callers can say more about the cause."""

    def __init__(self, message: str, site: tuple[str, int, str] | None = None, reason: str = "") -> None:
        super().__init__(message)
        self.site, self.reason = site, reason


class ContractError(GraphpruneError):
    """The caller's pass pipeline violates a pass's declared requirements: the wrong order, or a pass
    that does not run on this kind of model.  Something the caller changes."""


class ApplyError(GraphpruneError):
    """A plan could not be applied; the caller's model was left unchanged."""


class InternalError(GraphpruneError):
    """graphprune broke one of its own invariants: a bug to report, not something the caller can fix."""


class PostconditionError(InternalError):
    """A pass did not deliver what it promises (its stage, the N:M patterns it must keep): a bug in
    that pass, graphprune's own or the caller's custom one."""
