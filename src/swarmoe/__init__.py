"""swarmoe: a Kimi K2.5-style MoE runtime and agent swarm."""
