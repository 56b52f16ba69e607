"""EMPI: one consortium-wide patient id, derived without sharing demographics."""
