"""migrator: live migration of Linux processes and containers."""

__version__ = "0.1.0"
