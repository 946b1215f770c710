"""Every Redis key the federation uses, in one place.

Keys of one round share the hash tag ``{r}`` so that multi-key scripts stay on one
slot of a clustered Redis (ElastiCache cluster mode).
"""

from __future__ import annotations

PREFIX = "fedq:"

FEDERATION = PREFIX + "federation"  # hash: model, spec, scale bits, rounds, status, current
CLIENTS = PREFIX + "clients"  # set of client ids that joined
LEADER = PREFIX + "leader"  # coordinator lease


def client(client_id: str) -> str:
    """Hash of one client's registration (token digest, examples, capabilities)."""
    return f"{PREFIX}client:{client_id}"


def round_hash(round_id: int) -> str:
    """Hash of one round's record (status, deadline, counts, metrics)."""
    return f"{PREFIX}round:{{{round_id}}}"


def plans(round_id: int) -> str:
    """Hash client id -> msgpack training plan, for the round's participants."""
    return f"{PREFIX}round:{{{round_id}}}:plans"


def excluded(round_id: int) -> str:
    """Hash client id -> why it was not selected (e.g. its privacy budget)."""
    return f"{PREFIX}round:{{{round_id}}}:excluded"


def accepted(round_id: int) -> str:
    """Set of update ids the gateway acknowledged (after the broker confirmed)."""
    return f"{PREFIX}round:{{{round_id}}}:accepted"


def submitted(round_id: int) -> str:
    """Hash client id -> the update id it submitted this round."""
    return f"{PREFIX}round:{{{round_id}}}:submitted"


def applied(round_id: int) -> str:
    """Hash update id -> partial-sum key that counts it."""
    return f"{PREFIX}round:{{{round_id}}}:applied"


def partials(round_id: int) -> str:
    """Set of the round's partial-sum keys."""
    return f"{PREFIX}round:{{{round_id}}}:partials"


def partial(round_id: int, owner: str) -> str:
    """Hash of one worker's partial sum for a round (sum, examples, count)."""
    return f"{PREFIX}round:{{{round_id}}}:partial:{owner}"


def partial_staging(round_id: int, owner: str) -> str:
    """Hash of the sum fields a commit of ``owner`` writes before renaming it into place."""
    return f"{PREFIX}round:{{{round_id}}}:staging:{owner}"


def model(round_id: int) -> str:
    """Encoded global model that clients train in round ``round_id``."""
    return f"{PREFIX}model:{round_id}"


def velocity(round_id: int) -> str:
    """Server momentum (float64 bytes) that the step after round ``round_id - 1`` left."""
    return f"{PREFIX}velocity:{round_id}"


def parts(round_id: int, update_id: str, digest: str) -> str:
    """Hash part index -> payload bytes of a multi-part update still being gathered."""
    return f"{PREFIX}round:{{{round_id}}}:parts:{update_id}:{digest[:16]}"


# Both selection keys share one hash tag: the script that updates them touches both.
SELECTIONS = PREFIX + "{selections}"  # hash: client id -> rounds it was selected for
SELECTION_ROUNDS = PREFIX + "{selections}:rounds"  # set of rounds already counted
ASYNC_ACCEPTED = PREFIX + "async:accepted"  # hash: update id -> version it went into
