"""A discrete-event simulation of a fleet of llmopt replicas behind the router's own
policies (scripts/simulate_fleet.py), calibrated from llmopt's measured engine speed."""
