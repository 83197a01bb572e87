"""What the command-line entry points share."""
import argparse
import sys


class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are one 'error: ...' line and exit code 2, like every other
    user error of our command lines."""

    def error(self, message):
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)
