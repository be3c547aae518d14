"""`python -m grata.bench --worker SPEC_JSON`: one measurement in this fresh process
(started by `grata.bench.workers.run_worker`). The command is `grata bench`."""

import sys

from grata.bench.workers import worker_main

if len(sys.argv) > 2 and sys.argv[1] == "--worker":
    sys.exit(worker_main(sys.argv[2:]))
sys.exit("usage: python -m grata.bench --worker SPEC_JSON (the command is: grata bench)")
