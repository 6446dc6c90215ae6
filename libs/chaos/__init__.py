"""Chaos harness: a workload of SDK clients, a fault scheduler that breaks the
stack while they chat, raw observers that follow the protocol and nothing more,
a checker that reads what every device saw and lists every violation of the
promise (no loss, no duplicates, order), and the online delivery measure (I9:
a connected device gets everything within LIVENESS_S, by itself).
`python -m chaos --help`; docs/chaos.md."""
