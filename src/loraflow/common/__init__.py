"""Shared plumbing with no machine-learning dependency: the user-facing error type, atomic file
writes and JSONL reading, input checks and the provenance (versions) recorded with every result.

Every other package may import this one; it imports none of them.
"""
