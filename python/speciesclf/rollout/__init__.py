"""Old and new versions side by side: a :class:`Deployment` of a primary and a candidate with the predict
API of a Classifier, sticky canary and shadow routing, a :class:`Rollout` that moves traffic step by step
behind sequential gates, and its state kept in the registry. See docs/rollout.md."""

from .controller import VERDICTS, Rollout, RolloutError
from .deployment import CandidateRefused, Deployment, check_contract, routing_hash, routing_key_of
from .gates import GATES, GateResult, evaluate_gates
from .policy import DEFAULT_STEPS, GatePolicy, RolloutPolicy, RolloutSpecError, parse_rollout
from .state import PHASES, MemoryStore, RegistryStore

__all__ = ["CandidateRefused", "DEFAULT_STEPS", "Deployment", "GATES", "GatePolicy", "GateResult", "MemoryStore",
           "PHASES", "RegistryStore", "Rollout", "RolloutError", "RolloutPolicy", "RolloutSpecError", "VERDICTS",
           "check_contract", "evaluate_gates", "parse_rollout", "routing_hash", "routing_key_of"]
