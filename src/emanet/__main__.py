"""`python -m emanet`: the same program as the `emanet` command."""

from emanet.cli.main import run

if __name__ == "__main__":
    run()
