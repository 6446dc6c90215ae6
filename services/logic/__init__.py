"""logic: the only owner of the message store.

Send (dedup, sequence numbers, transactional outbox), fan-out into timelines, paged
sync, history, conversations and groups, and the repair loop that keeps PostgreSQL
the source of truth when JetStream loses triggers (invariants I1-I5, I8).
"""
