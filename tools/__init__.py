"""Lab tooling for a source checkout: real DSSS networks for tests, the benchmarks and `make demo`.

Not part of the installed package (setup.py installs `dsss` and the twistd dropin only): the
process harness sets PYTHONPATH to the checkout so twistd finds `twisted/plugins/dsss_plugins.py`,
and the NAT lab needs root, iproute2 and iptables. Run from the checkout's root, e.g.
`python -m tools.demo`, `python -m tools.netns check|cleanup`.
"""
