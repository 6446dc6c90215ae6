"""gateway: holds client streams, enforces per-connection client_id order, sends
send-ACKs, keeps device routes in Redis, writes pushes from pushers to streams and
forwards delivery ACKs back to them.

Modules: `auth` (tokens), `ordering` (the client_id rule), `connection` (one
stream), `hub` (the streams of this process and their routes), `routes` (the Redis
key layout), `upstream` (calls to logic, pushers, other gateways), `servicer`
(gRPC adapters), `config`, `server`.
"""
