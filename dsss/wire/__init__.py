"""Sans-I/O message formats: the control channel, datagrams and transfers (no Twisted)."""
