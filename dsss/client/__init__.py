"""The DSSS client: the CLI (`python -m dsss.client`), the gateway, and the flows they share."""
