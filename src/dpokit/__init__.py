"""dpokit: the DPO family of preference-optimization methods, correct, fast, and in one place."""

__version__ = "0.1.0"
