"""`python -m benchmarks.efficient`."""

from benchmarks.efficient.grid import main

main()
