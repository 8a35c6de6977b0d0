"""`python -m benchmarks.paper`: runs the grid (see `benchmarks.paper.cli`)."""

from benchmarks.paper import cli

if __name__ == "__main__":
    cli.main()
