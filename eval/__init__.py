"""Evaluation of KEEP:R and the methods it replaces: identity leakage, realism/utility, temporal stability."""
