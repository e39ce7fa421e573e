"""Attacks (PGD-k, TOD) and training objectives (standard, AT, TOD, KDFA, SSFA, FA = equation 3)."""
