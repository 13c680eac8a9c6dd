"""End-to-end tests: training runs, scripts run as subprocesses, the real corpus, several processes."""
