"""The storage agent: keeps parts for others and serves them over QUIC."""
