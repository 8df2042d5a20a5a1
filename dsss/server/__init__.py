"""The discovery server: knows the agents, answers where parts are, introduces peers."""
