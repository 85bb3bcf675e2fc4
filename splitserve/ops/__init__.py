"""Operating a running cluster: Ray job submission, the status table, structured logs."""
