"""`python -m dsss.client ...`"""

import sys

from twisted.internet.task import react

from dsss.client.cli import main


def entry() -> None:
    react(main, sys.argv[1:])


if __name__ == "__main__":
    entry()
