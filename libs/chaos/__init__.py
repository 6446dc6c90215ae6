"""Chaos harness: a workload of SDK clients, a fault scheduler that breaks the
stack while they chat, and a checker that reads what every device saw and lists
every violation of the promise (no loss, no duplicates, order).
`python -m chaos --help`; docs/chaos.md."""
