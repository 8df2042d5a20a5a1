"""DSSS: a decentralized secure storage system built on Twisted."""

__version__ = "0.2.0"
