from setuptools import find_packages, setup

# Metadata lives in setup.cfg. The twistd dropin directory twisted/plugins/ has no __init__.py
# (it must not shadow Twisted's own package), so it is listed by hand.
setup(
    packages=find_packages(include=["dsss", "dsss.*"]) + ["twisted.plugins"],
    package_data={"dsss": ["py.typed"], "twisted.plugins": ["dsss_plugins.py"]},
)
