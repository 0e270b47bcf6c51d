"""Domain errors of governance. ``agora.api`` renders any exception with ``code`` and ``http_status``."""


class GovernanceError(Exception):
    code = "governance_error"
    http_status = 409


class ProposalStateError(GovernanceError):
    """The proposal is not in a state that allows this (e.g. voting on a draft, approving a defeated one)."""

    code = "invalid_state"
    http_status = 409


class VotingClosed(ProposalStateError):
    code = "voting_closed"


class NotAllowed(GovernanceError):
    """The caller may not do this to this proposal (e.g. cancelling someone else's proposal)."""

    code = "forbidden"
    http_status = 403


class NotEligible(NotAllowed):
    """The member may not vote: no verified e-mail address, or the eligibility rule does not hold."""

    code = "not_eligible"
