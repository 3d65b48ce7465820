"""Engines for the one training loop (trainers/loop.py); the protocol is in base.py."""
