"""Unit tests: each runs in about a second or less on one CPU thread."""
