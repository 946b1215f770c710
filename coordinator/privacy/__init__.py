"""Server-side differential privacy: ε accounting and the per-client privacy ledger."""

from .accountant import ACCOUNTANTS, Charge, epsilon, tradeoff_table
from .ledger import BudgetExceededError, LedgerUnavailableError, PrivacyLedger, PrivacyLedgerError

__all__ = [
    "ACCOUNTANTS",
    "BudgetExceededError",
    "Charge",
    "LedgerUnavailableError",
    "PrivacyLedger",
    "PrivacyLedgerError",
    "epsilon",
    "tradeoff_table",
]
