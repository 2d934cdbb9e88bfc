"""eP-ALM: a frozen OPT and a frozen perception encoder joined by a trained linear injection and soft prompt."""

__version__ = "0.1.0"
