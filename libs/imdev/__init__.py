"""Development and test support: real PostgreSQL, Redis, NATS and service processes
on free loopback ports, and the local stack behind `make run`."""
