"""The test suite: unit/ (each test a second or less), e2e/ (training runs, scripts as subprocesses, the real
corpus, several processes), helpers/ (builders shared by both), conftest.py (shared fixtures)."""
