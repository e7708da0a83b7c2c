"""`epispec load`: a bounded load test of a running (or spawned) server, loopback only.

N concurrent clients mix `/generate`, `/v1/completions` and `/v1/chat/completions`, streamed
and not, some leaving streams midway on purpose, for a fixed time (and at most a fixed number
of requests); then it reports success rate, errors by kind, latency percentiles, what is
still running in the server afterwards (requests, side-channel and proposer states: all must
be 0) and the server's memory (RSS of its process tree) growth after the warm-up.

- `client.py`: one request of a random kind, classified (ok, left on purpose, error kinds)
- `probe.py`: the server under test: spawn or attach, RSS samples, state after the run
- `cli.py`: the command: workers, the report, the exit status
"""
