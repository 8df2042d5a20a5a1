"""DSSS: a decentralized secure storage system built on Twisted."""

__version__ = "0.1.0"
