"""An OpenAI-compatible front over replicas (`llmopt router`): routing policies, health
checks, failover and metrics. It speaks HTTP to its replicas and never imports the
engine; the fleet simulator (sim/) drives the same policies over simulated replicas."""
