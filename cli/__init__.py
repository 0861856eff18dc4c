"""`ik`: the InfraKitchen command line for people (python -m cli)."""
