"""Policies: the protocol the runner talks to and its implementations."""
