"""pusher: consumes logic's JetStream triggers, has logic fan each conversation out
into its members' timelines, pushes the new entries to online devices through
their gateways, and retransmits from a hashed timing wheel until each device ACKs.

Modules: `consumer` (JetStream), `delivery` (routes, Deliver, retransmits),
`timingwheel` (pure), `routes` (reads the gateway's Redis layout), `servicer`
(AckDelivery), `config`, `server`.
"""
