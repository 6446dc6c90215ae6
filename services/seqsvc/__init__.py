"""seqsvc: per-key strictly increasing 64-bit sequence numbers (WeChat seqsvr style).

See README.md in this folder for the guarantees, the API and the configuration.
"""
