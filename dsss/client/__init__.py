"""The DSSS client: `python -m dsss.client put/get`."""
