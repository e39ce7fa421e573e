"""fa_train: adversarial training of object detectors with feature alignment (KDFA, SSFA)."""

__version__ = "0.1.0"
